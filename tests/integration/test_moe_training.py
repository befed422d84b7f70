"""MoE training under data and expert parallelism equals one process.

The reference is one process (EP=1, experts ordinary DeepSpeed parameters) with the same
global batch split into the same micro-batches, so the per-micro-batch router losses and
capacity drops are the same computations. Over 10 steps (fp32, clipping active) the
losses, validation losses and global gradient norms must agree to 1e-5 / 1e-4, and the
final experts, gathered from the per-rank checkpoint files, must equal the reference's
(relative Frobenius error <= 1e-5). Covered: DP=2 with replicated experts, EP=2, EP=2
inside DP=4 (two copies of each expert: their gradients are summed over the
expert-data-parallel group), L³ + MoE with capacity dropping under EP=2 and ZeRO-2 (L³ rows
sharded too) and under TP=2, exact resume with EP=2, and refusal to resume with another EP.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from training_harness import (assert_losses_close, metrics, run_expecting_error, run_trainer, stop_and_resume,
                              tiny_l3_config, write_config)

GRAD_CLIP = 0.5
STEPS = 10
MOE = {"blocks": [0, 1], "num_experts": 4, "top_k": 2, "expert_hidden_size": 64, "aux_loss_weight": 0.01,
       "z_loss_weight": 0.001}


def _config(root: Path, corpus, allocation, with_l3: bool, capacity_factor: float | None) -> Path:
    tree = tiny_l3_config(root / "run", corpus, allocation)
    if not with_l3:
        tree["l3"] = {"after_blocks": []}
    tree["moe"] = {**MOE, "capacity_factor": capacity_factor}
    tree["training"].update(steps=STEPS, micro_batch_size=2, global_batch_size=8, eval_interval=5, log_interval=1)
    tree["optimizer"]["grad_clip"] = GRAD_CLIP
    tree["checkpoint"]["save_interval"] = 100
    return write_config(root / "config.yaml", tree)


@pytest.fixture(scope="module")
def moe_config(tmp_path_factory, tiny_corpus, tiny_allocation) -> Path:
    return _config(tmp_path_factory.mktemp("moe"), tiny_corpus, tiny_allocation, with_l3=False, capacity_factor=None)


@pytest.fixture(scope="module")
def l3_moe_config(tmp_path_factory, tiny_corpus, tiny_allocation) -> Path:
    return _config(tmp_path_factory.mktemp("l3_moe"), tiny_corpus, tiny_allocation, with_l3=True,
                   capacity_factor=1.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs by (config, ranks, overrides), made on first use and shared between tests."""
    made = {}

    def run(config: Path, nproc: int, *overrides: str) -> Path:
        key = (config, nproc, overrides)
        if key not in made:
            run_dir = tmp_path_factory.mktemp(f"{config.parent.name}_n{nproc}") / "run"
            result = run_trainer(config, f"run_dir={run_dir}", *overrides, nproc=nproc)
            if "moe.expert_parallel=2" in overrides:
                assert "experts split over 2 ranks (EP)" in result.stdout
            made[key] = run_dir
        return made[key]

    return run


def _experts_by_layer(run_dir: Path) -> list[list]:
    """[layer][w1, w3, w2] of the final checkpoint: from the module (EP=1) or gathered from the
    per-rank files (EP>1), checking that copies of the same experts agree."""
    import torch

    final = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    files = sorted(final.glob("experts_rank*.pt"))
    if not files:
        module = torch.load(final / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return [[module[f"blocks.{b}.feed_forward.experts.{w}"] for w in ("w1", "w3", "w2")] for b in MOE["blocks"]]
    by_ep_rank = {}
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=False)
        ep_rank = state["layout"]["ep_rank"]
        if ep_rank in by_ep_rank:  # another expert-data-parallel copy: must be identical
            for copy, first in zip(state["tensors"], by_ep_rank[ep_rank]):
                assert torch.equal(copy, first), f"{path.name}: copies of EP rank {ep_rank}'s experts differ"
        by_ep_rank[ep_rank] = state["tensors"]
    shards = [by_ep_rank[r] for r in sorted(by_ep_rank)]
    return [[torch.cat([shard[3 * layer + w] for shard in shards]) for w in range(3)]
            for layer in range(len(MOE["blocks"]))]


def _assert_same_training(run_dir: Path, reference: Path) -> None:
    reference_norms = metrics(reference, "train/grad_norm")
    assert sum(norm > GRAD_CLIP for norm in reference_norms.values()) >= 3  # clipping does act
    losses = metrics(run_dir, "train/loss")
    assert losses[STEPS] < losses[1] - 0.3
    assert_losses_close(losses, metrics(reference, "train/loss"), rtol=1e-5)
    assert_losses_close(metrics(run_dir, "val/loss"), metrics(reference, "val/loss"), rtol=1e-5)
    assert_losses_close(metrics(run_dir, "train/moe_aux_loss"), metrics(reference, "train/moe_aux_loss"), rtol=1e-5)
    norms = metrics(run_dir, "train/grad_norm")
    assert norms.keys() == reference_norms.keys()
    for step, norm in norms.items():
        assert norm == pytest.approx(reference_norms[step], rel=1e-4)
    for got_layer, want_layer in zip(_experts_by_layer(run_dir), _experts_by_layer(reference)):
        for got, want in zip(got_layer, want_layer):
            assert got.shape == want.shape
            assert float((got - want).norm() / want.norm()) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("nproc,overrides", [(2, ()), (2, ("moe.expert_parallel=2",)),
                                             (4, ("moe.expert_parallel=2", "parallel.zero_stage=1"))],
                         ids=["dp2_ep1", "dp2_ep2", "dp4_ep2_zero1"])
def test_moe_data_and_expert_parallel_equal_one_process(moe_config, runs, nproc, overrides):
    _assert_same_training(runs(moe_config, nproc, *overrides), runs(moe_config, 0))


@pytest.mark.slow
@pytest.mark.parametrize("nproc,overrides", [(2, ("moe.expert_parallel=2", "parallel.zero_stage=2")),
                                             (2, ("parallel.tensor_parallel=2",))],
                         ids=["dp2_ep2_zero2", "tp2"])
def test_l3_with_moe_and_capacity_equals_one_process(l3_moe_config, runs, nproc, overrides):
    reference = runs(l3_moe_config, 0)
    assert 0 < metrics(reference, "moe/block_0/dropped_fraction")[STEPS] < 0.5  # capacity 1.0 drops some
    assert len(metrics(reference, "l3/entropy_after_block_0")) == STEPS  # the L³ layer is there and runs
    _assert_same_training(runs(l3_moe_config, nproc, *overrides), reference)


@pytest.mark.slow
def test_moe_metrics_reach_tensorboard(moe_config, runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = runs(moe_config, 2, "moe.expert_parallel=2")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/moe_aux_loss", "train/moe_z_loss", "moe/block_1/aux_loss", "moe/block_1/load_max_over_mean",
                *(f"moe/block_0/load_expert_{e:03d}" for e in range(4))}
    assert expected <= tags
    loads = [events.Scalars(f"moe/block_0/load_expert_{e:03d}")[-1].value for e in range(4)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-5)
    assert events.Scalars("train/moe_aux_loss")[-1].value >= 1.0 - 1e-5  # E·Σ f·P is minimal (1) when balanced


@pytest.mark.slow
def test_expert_parallel_resume_continues_the_trajectory(moe_config, runs, tmp_path):
    whole = runs(moe_config, 2, "moe.expert_parallel=2")
    split = tmp_path / "split"
    stop_and_resume(moe_config, split, ["moe.expert_parallel=2"], stop_after=5, nproc=2)
    assert len(list((split / "checkpoints" / "step_00000005").glob("experts_rank*.pt"))) == 2
    assert metrics(split, "train/loss") == metrics(whole, "train/loss")
    message = run_expecting_error("--config", str(moe_config), f"run_dir={split}", "--resume")
    assert "moe.expert_parallel=2" in message and "new run_dir" in message
