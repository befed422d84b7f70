"""Config validation (the MoE and sequence-parallel keys, and the world-dependent checks): each inconsistency is an
L3TrainError naming the key and saying how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest

from l3train.config import config_from_dict
from l3train.errors import L3TrainError

MOE = ["moe.blocks=[0,1]", "moe.num_experts=4", "moe.top_k=2"]

CASES = [
    ([*MOE, "moe.top_k=5"], "moe.top_k: must be <= moe.num_experts (4), got 5"),
    ([*MOE, "moe.blocks=[0,4]"], "moe.blocks: indices must be in 0..3"),
    ([*MOE, "moe.blocks=[1,1]"], "moe.blocks: has duplicates"),
    ([*MOE, "moe.capacity_factor=0"], "moe.capacity_factor: must be > 0, or null for dropless"),
    ([*MOE, "moe.aux_loss_weight=-1"], "moe.aux_loss_weight: and moe.z_loss_weight must be >= 0"),
    ([*MOE, "moe.expert_parallel=3"], "moe.expert_parallel: must divide moe.num_experts (4), got 3"),
    ([*MOE, "moe.expert_parallel=2", "parallel.tensor_parallel=2"],
     "moe.expert_parallel: > 1 needs parallel.tensor_parallel=1"),
    ([*MOE, "moe.expert_hidden_size=0"], "moe.expert_hidden_size: must be >= 1"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel: needs parallel.tensor_parallel > 1"),
    (["parallel.sequence_parallel=true", "parallel.tensor_parallel=2", "data.seq_length=127"],
     "parallel.sequence_parallel: needs data.seq_length (127) divisible by parallel.tensor_parallel (2)"),
    (["parallel.sequence_parallel=true", "parallel.tensor_parallel=2", *MOE],
     "parallel.sequence_parallel: does not support MoE blocks"),
    (["training.steps=12", "optimizer.warmup_steps=2", "training.profile_steps=[10,13]"],  # never ends: no profile
     "training.profile_steps: must be [] or [first, last) with 0 <= first < last <= training.steps=12"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[case[1].split(":")[0] + str(i) for i, case in enumerate(CASES)])
def test_inconsistent_moe_and_parallel_settings_are_refused(overrides, message):
    with pytest.raises(L3TrainError) as error:
        config_from_dict({}, overrides)
    assert message in str(error.value)


def test_consistent_moe_and_sequence_parallel_settings_load():
    cfg = config_from_dict({}, [*MOE, "moe.expert_parallel=2", "moe.capacity_factor=1.25"])
    assert cfg.moe.capacity_factor == 1.25 and cfg.moe.expert_parallel == 2
    cfg = config_from_dict({}, ["parallel.sequence_parallel=true", "parallel.tensor_parallel=2"])
    assert cfg.parallel.sequence_parallel


def test_rank_local_tensors_in_bf16_need_zero_2_or_3():
    from l3train.config import validate_for_world

    l3 = ["l3.after_blocks=[0]", "l3.allocation=a.npz"]
    with pytest.raises(L3TrainError, match="need parallel.zero_stage 2 or 3 \\(got 1\\)"):
        validate_for_world(config_from_dict({}, [*l3, "training.precision=bf16", "parallel.zero_stage=1"]), 2)
    validate_for_world(config_from_dict({}, [*l3, "training.precision=bf16", "parallel.zero_stage=1"]), 1)  # not sharded
    validate_for_world(config_from_dict({}, [*l3, "training.precision=bf16", "parallel.zero_stage=2"]), 2)
    validate_for_world(config_from_dict({}, [*l3, "parallel.zero_stage=1"]), 2)  # fp32: any stage


@pytest.mark.parametrize("overrides,ranks,stage", [
    (["parallel.zero_stage=1"], 1, 0),  # fp32, one data-parallel rank: nothing to partition
    (["parallel.zero_stage=3", "parallel.tensor_parallel=2"], 2, 0),  # TP=2 × DP=1
    (["parallel.zero_stage=1"], 2, 1),
    (["parallel.zero_stage=2", "training.precision=bf16"], 1, 2),  # bf16 keeps its stage (fp32 accumulation)
])
def test_zero_stage_run_is_0_for_fp32_with_one_data_parallel_rank(overrides, ranks, stage):
    from l3train.config import validate_for_world

    assert validate_for_world(config_from_dict({}, ["model.n_heads=4", "model.n_kv_heads=2", *overrides]),
                              ranks).zero_stage == stage


@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_fit_one_two_and_four_ranks(path, ranks):
    """The micro-batch shrinks to a rank's share of the global batch when needed, so every
    shipped config starts unchanged on 1, 2 or 4 ranks with the same global batch."""
    from l3train.config import load_config, validate_for_world

    cfg = load_config(path)
    layout = validate_for_world(cfg, ranks)
    assert layout.micro_batch_size <= cfg.training.micro_batch_size
    assert layout.micro_batch_size * layout.gradient_accumulation_steps * layout.data_parallel == \
        cfg.training.global_batch_size


def test_a_batch_that_does_not_split_says_what_to_set():
    from l3train.config import validate_for_world

    with pytest.raises(L3TrainError, match=r"training.global_batch_size=6 must be a multiple of the data-parallel "
                                           r"ranks \(4\); set it to a multiple of 4"):
        validate_for_world(config_from_dict({}, ["training.global_batch_size=6", "training.micro_batch_size=2"]), 4)
    with pytest.raises(L3TrainError, match=r"training.micro_batch_size=8 must divide a rank's share of the global "
                                           r"batch \(24 / 2 ranks = 12\); set it to a divisor of 12"):
        validate_for_world(config_from_dict({}, ["training.global_batch_size=24"]), 2)
    with pytest.raises(L3TrainError, match=r"parallel.tensor_parallel=2 must divide the number of ranks \(3\)"):
        validate_for_world(config_from_dict({}, ["parallel.tensor_parallel=2"]), 3)


def test_exponent_floats_without_a_dot_are_floats():
    """PyYAML (YAML 1.1) reads `3e-4` as a string; configs and overrides mean a number."""
    cfg = config_from_dict({"optimizer": {"min_lr": "1E-5"}}, ["optimizer.lr=5e-4"])
    assert cfg.optimizer.lr == 5e-4 and cfg.optimizer.min_lr == 1e-5
    with pytest.raises(L3TrainError, match="optimizer.lr: expected float, got str '5e-4x'"):
        config_from_dict({}, ["optimizer.lr=5e-4x"])
