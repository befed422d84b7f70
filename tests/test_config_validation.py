"""Config validation of the MoE and sequence-parallel keys: each inconsistency is an
L3TrainError naming the key and saying how to fix it."""

from __future__ import annotations

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
    from l3train.train import check_rank_local_precision

    with pytest.raises(L3TrainError, match="need parallel.zero_stage 2 or 3 \\(got 1\\)"):
        check_rank_local_precision(config_from_dict({}, ["training.precision=bf16", "parallel.zero_stage=1"]))
    check_rank_local_precision(config_from_dict({}, ["training.precision=bf16", "parallel.zero_stage=2"]))
    check_rank_local_precision(config_from_dict({}, ["parallel.zero_stage=1"]))  # fp32: any stage
