"""Megatron-style tensor parallelism: module-level equality with the plain model, training runs
at TP=2 and TP=2×DP=2 equal to one process, resume per TP rank, and one-line config errors.

Run as a script under torchrun, this file is also the worker of the module-level test: it
builds a plain model, shards a copy over the TP group, and writes the largest differences
of logits, loss and every gradient (gathered over TP) to a JSON file.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from shared_runs import parallel_layout
from training_harness import (REPO, assert_crash_resume_is_exact, assert_losses_close, finish_worker, free_port,
                              metrics, run_expecting_error, run_trainer, trainer_env)


def _relative_difference(actual, expected) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def _module_worker(output: Path) -> None:
    """Plain DecoderLM vs its TP-sharded copy on one batch; rank 0 writes the largest relative
    differences over all ranks."""
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from l3train.config import L3Config, ModelConfig
    from l3train.model.llama import DecoderLM
    from l3train.parallel.state import initialize_parallel
    from l3train.parallel.tensor_parallel import parallelize_tensor, vocab_parallel_token_losses

    dist.init_process_group("gloo")
    state = initialize_parallel(dist.get_world_size())
    results = {}
    # Grouped-query attention (4 query heads, 2 KV heads) with an L³ layer, and tied embeddings;
    # each also with sequence parallelism (norms, W_up/W_mix and the unsharded L³ table then
    # see half the positions per rank: their gradients must still come out whole).
    for name, tie, sequence_parallel in (("gqa_l3", False, False), ("tied", True, False),
                                         ("gqa_l3_sp", False, True), ("tied_sp", True, True)):
        cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=48,
                          max_seq_len=16, tie_embeddings=tie)
        l3 = L3Config(after_blocks=[0], d_emb=32, d_up=48)
        rows = np.random.default_rng(0).integers(1, 5, cfg.vocab_size)
        torch.manual_seed(0)
        plain = DecoderLM(cfg, l3, rows)
        parallel = parallelize_tensor(copy.deepcopy(plain), state, sequence_parallel)
        generator = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, cfg.vocab_size, (3, 16), generator=generator)
        labels = torch.randint(0, cfg.vocab_size, (3, 16), generator=generator)

        logits = plain(tokens).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        shard_logits = parallel(tokens).logits
        gathered = gather_from_tensor_model_parallel_region(shard_logits.detach())
        tp_loss = vocab_parallel_token_losses(shard_logits, labels).mean()
        tp_loss.backward()

        diffs = {"logits": _relative_difference(gathered, logits.detach()),
                 "loss": abs(tp_loss.item() - loss.item()) / loss.item()}
        sharded = []
        shard_params = dict(parallel.named_parameters())
        assert shard_params.keys() == dict(plain.named_parameters()).keys()
        for param_name, param in plain.named_parameters():
            grad = shard_params[param_name].grad
            if getattr(shard_params[param_name], "tensor_model_parallel", False):
                sharded.append(param_name)
                parts = [torch.empty_like(grad) for _ in range(state.tp_size)]
                dist.all_gather(parts, grad, group=state.tp_group)
                grad = torch.cat(parts, dim=shard_params[param_name].partition_dim)
            diffs[f"grad {param_name}"] = _relative_difference(grad, param.grad)
        # The worst over ranks: replicated gradients must be right on every TP rank, not only on rank 0.
        worst = torch.tensor(list(diffs.values()), dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        results[name] = {"diffs": dict(zip(diffs, worst.tolist())), "sharded": sharded}
    if dist.get_rank() == 0:
        output.write_text(json.dumps(results, indent=1))
    finish_worker()


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *args]
    result = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.mark.slow
def test_tp2_forward_and_gradients_equal_the_plain_model(tmp_path):
    output = tmp_path / "diffs.json"
    _torchrun(2, __file__, str(output))
    results = json.loads(output.read_text())
    for name, case in results.items():
        # Every backbone matrix is sharded; norms and the L³ layer stay replicated.
        expected = {"embedding.weight"} | {f"blocks.{b}.{m}.weight" for b in range(2) for m in (
            "attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
        assert set(case["sharded"]) == expected | ({"output.weight"} if not name.startswith("tied") else set())
        worst = max(case["diffs"].items(), key=lambda item: item[1])
        assert worst[1] <= 1e-5, (name, worst)
    assert sorted(results) == ["gqa_l3", "gqa_l3_sp", "tied", "tied_sp"]
    assert "grad output.weight" not in results["tied"]["diffs"]  # one shared parameter, compared once
    assert "grad lookups.0.lookup.rows.key_table" in results["gqa_l3_sp"]["diffs"]


@pytest.fixture(scope="module")
def reference_run(shared_runs):
    """One process: what every TP run must reproduce (the harness's tiny L³ model, GQA: 4 heads,
    2 KV heads; 20 steps with clipping active, ZeRO-0)."""
    return shared_runs.get("equivalence")


@pytest.fixture(scope="module")
def config(reference_run) -> Path:
    return reference_run.config


@pytest.fixture(scope="module")
def tp2_run(shared_runs):
    """TP=2 on 2 ranks (one data-parallel replica), ZeRO-0, same config."""
    return shared_runs.get("equivalence", *parallel_layout(tp=2), nproc=2)


def _assert_equal_to_reference(run_dir: Path, reference_dir: Path) -> None:
    losses = metrics(run_dir, "train/loss")
    assert losses[20] < losses[1] - 0.5  # it learns
    assert_losses_close(losses, metrics(reference_dir, "train/loss"), rtol=1e-5)
    assert_losses_close(metrics(run_dir, "val/loss"), metrics(reference_dir, "val/loss"), rtol=1e-5)
    grad_norms, reference_norms = metrics(run_dir, "train/grad_norm"), metrics(reference_dir, "train/grad_norm")
    assert grad_norms.keys() == reference_norms.keys()
    for step, norm in grad_norms.items():  # counts every sharded and replicated gradient exactly once
        assert norm == pytest.approx(reference_norms[step], rel=1e-4)


@pytest.mark.slow
def test_tp2_training_equals_one_process(reference_run, tp2_run):
    assert "2 rank(s) (TP=2 × DP=1)" in tp2_run.stdout
    _assert_equal_to_reference(tp2_run.run_dir, reference_run.run_dir)
    # One model file per TP rank (DeepSpeed names them by model-parallel rank).
    final = tp2_run.checkpoint(20)
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= {p.name for p in final.iterdir()}


@pytest.mark.slow
def test_tp2_dp2_zero1_training_equals_one_process(shared_runs, reference_run):
    run = shared_runs.get("equivalence", *parallel_layout(tp=2, stage=1), nproc=4)
    assert "4 rank(s) (TP=2 × DP=2)" in run.stdout
    _assert_equal_to_reference(run.run_dir, reference_run.run_dir)


@pytest.mark.slow
def test_tp2_resume_continues_the_uninterrupted_trajectory(config, tp2_run, tmp_path):
    """Each TP rank saves and reloads its own shard: a stop after 10 steps and --resume give the
    losses of the uninterrupted TP=2 run exactly; resuming it with another TP size is refused."""
    whole_dir = tp2_run.run_dir
    split = tmp_path / "split"
    common = [f"run_dir={split}", "parallel.tensor_parallel=2"]
    run_trainer(config, *common, "--exit-after-steps", "10", nproc=2)
    second = run_trainer(config, *common, "--resume", nproc=2)
    assert "resuming at step 10" in second.stdout
    assert metrics(split, "train/loss") == metrics(whole_dir, "train/loss")
    message = run_expecting_error("--config", str(config), f"run_dir={split}", "--resume")
    assert "was written with parallel.tensor_parallel=2 but the config has 1" in message


@pytest.mark.slow
def test_tp2_sigkill_and_resume_is_bit_identical(config, tp2_run, tmp_path):
    """Every process SIGKILLed at a random step after a checkpoint; --resume gives, from the
    checkpoint on, the uninterrupted TP=2 run's per-step losses bit for bit."""
    assert_crash_resume_is_exact(config, tp2_run.run_dir, tmp_path / "crashed", ["parallel.tensor_parallel=2"])


def test_tensor_parallel_config_errors_are_one_line(config, tmp_path):
    run_dir = f"run_dir={tmp_path / 'run'}"
    message = run_expecting_error("--config", str(config), run_dir, "parallel.tensor_parallel=4")
    assert message == ("error: model.n_kv_heads=2 is not divisible by parallel.tensor_parallel=4: "
                       "tensor parallelism splits it over the ranks")
    message = run_expecting_error("--config", str(config), run_dir, "parallel.tensor_parallel=2")
    assert "parallel.tensor_parallel=2 must divide the number of ranks (1)" in message
    assert not (tmp_path / "run").exists()


def test_tensor_parallel_sizes_are_checked_at_load_naming_the_key():
    from l3train.config import config_from_dict
    from l3train.errors import L3TrainError

    sizes = ["model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden_size=128", "model.vocab_size=512"]
    config_from_dict({}, [*sizes, "parallel.tensor_parallel=2"])
    with pytest.raises(L3TrainError, match=r"model.n_kv_heads=2 is not divisible by parallel.tensor_parallel=4"):
        config_from_dict({}, [*sizes, "parallel.tensor_parallel=4"])
    with pytest.raises(L3TrainError, match=r"model.vocab_size=511"):
        config_from_dict({}, ["model.n_kv_heads=4", "model.vocab_size=511", "parallel.tensor_parallel=2"])


if __name__ == "__main__":
    _module_worker(Path(sys.argv[1]))
