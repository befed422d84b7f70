"""Checkpoint conversion, proven by logits and losses on checkpoints of real training runs.

- consolidate: TP=2 × DP=2 with ZeRO-2 and sharded rows, DP=2 with ZeRO-3, and an
  expert-parallel MoE run (EP=2, with an L³ layer too) → one plain model whose logits equal
  the training layout's own (resumed in that layout by a torchrun worker), and whose tensors
  equal DeepSpeed's `zero_to_fp32` for every tensor it holds (also for a bf16 run: the fp32
  master weights);
- reshard: a one-process checkpoint → TP=2 and → DP=2 (ZeRO-2, rows sharded: another shard
  plan); the resumed run's losses equal the original layout continuing (≤ 1e-5), and the
  resharded checkpoint consolidates back to exactly the same weights and AdamW moments;
- determinism, and corrupt or mismatched inputs refused in one line (exit 2), no output.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from shared_runs import BF16_ZERO2, EQUIVALENCE_STEPS, parallel_layout, zero_stage
from training_harness import REPO, assert_losses_close, metrics, run_trainer, trainer_command, trainer_env

from l3train.checkpoint.consolidated import Consolidated, load_model

pytestmark = pytest.mark.slow
CONVERT = [sys.executable, str(REPO / "tools/convert_checkpoint.py")]
WORKER = REPO / "tests/integration/workers/layout_logits_worker.py"
LAYOUTS = {  # name: (ranks, overrides) of the session's shared `equivalence` runs
    "tp2_dp2_zero2_rows": (4, parallel_layout(tp=2, stage=2)),
    "dp2_zero3_rows": (2, zero_stage(3)),
    "ep2_moe_zero2": (2, ("moe.blocks=[1]", "moe.num_experts=4", "moe.expert_parallel=2", *zero_stage(2))),
    "dp2_bf16_zero2_rows": (2, BF16_ZERO2),
}
HALFWAY = EQUIVALENCE_STEPS // 2


def convert(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*CONVERT, *map(str, args)], cwd=REPO, env=trainer_env(), capture_output=True, text=True,
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def refused(*args: str) -> str:
    """Run the converter expecting a user error: exit 2, one stderr line (returned)."""
    result = convert(*args, check=False)
    lines = [line for line in result.stderr.splitlines() if "[WARNING]" not in line]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def config(shared_runs) -> Path:
    return shared_runs.config("equivalence")


@pytest.fixture(scope="module")
def trained(shared_runs) -> dict[str, Path]:
    """Run directories of each layout of LAYOUTS (shared runs, made on first use)."""
    def run(name: str) -> Path:
        nproc, overrides = LAYOUTS[name]
        return shared_runs.get("equivalence", *overrides, nproc=nproc).run_dir

    return run


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(3))


def layout_logits(config: Path, run_dir: Path, name: str, tokens: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    nproc, overrides = LAYOUTS[name]
    run_dir = shutil.copytree(run_dir, tmp_path / "resumed")  # the worker's Trainer writes into the run it resumes
    torch.save(tokens, tmp_path / "tokens.pt")
    command = trainer_command(config, nproc=nproc)
    command = [*command[:command.index("l3train.train") - 1], str(WORKER), str(config), str(tmp_path / "tokens.pt"),
               str(tmp_path / "logits.pt"), f"run_dir={run_dir}", *overrides]
    result = subprocess.run(command, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(tmp_path / "logits.pt")


@pytest.mark.parametrize("name", ["tp2_dp2_zero2_rows", "dp2_zero3_rows", "ep2_moe_zero2"])
def test_consolidated_logits_equal_the_training_layouts(name, config, trained, tokens, tmp_path):
    run_dir = trained(name)
    convert("consolidate", run_dir, "--output", tmp_path / "plain")
    model = load_model(Consolidated(tmp_path / "plain"))
    with torch.no_grad():
        plain = model(tokens).logits
    original = layout_logits(config, run_dir, name, tokens, tmp_path)
    assert plain.shape == original.shape == (2, 48, 512)
    assert (plain - original).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["dp2_zero3_rows", "ep2_moe_zero2", "dp2_bf16_zero2_rows"])
def test_consolidated_tensors_equal_zero_to_fp32(name, trained, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = trained(name)
    convert("consolidate", run_dir, "--output", tmp_path / "plain")
    ours = Consolidated(tmp_path / "plain").state_dict()
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"))
    assert len(theirs) > 10 and set(theirs) <= set(ours)
    for tensor_name, value in theirs.items():
        assert torch.equal(ours[tensor_name], value), tensor_name
    # The rank-local tensors (rows, experts) are ours alone: DeepSpeed never held them.
    assert set(ours) - set(theirs)


def test_consolidation_is_deterministic_and_shards_past_the_size_limit(trained, tmp_path):
    run_dir = trained("tp2_dp2_zero2_rows")
    for name in ("a", "b"):
        convert("consolidate", run_dir, "--output", tmp_path / name, "--max-shard-size", "300K")
    files = sorted(path.name for path in (tmp_path / "a").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "a" / "model.safetensors.index.json").is_file()
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert match == files and not mismatch and not errors


@pytest.fixture(scope="module")
def halfway(config, shared_runs, tmp_path_factory) -> tuple[Path, Path]:
    """A one-process ZeRO-0 run stopped halfway, and the same run uninterrupted (the shared
    single-process run): the reference."""
    stopped = tmp_path_factory.mktemp("halfway") / "run"
    run_trainer(config, f"run_dir={stopped}", "--exit-after-steps", str(HALFWAY))
    return stopped, shared_runs.get("equivalence").run_dir


@pytest.mark.parametrize("nproc,layout", [(2, ["parallel.tensor_parallel=2"]),
                                          (2, ["parallel.zero_stage=2"])], ids=["tp1_to_tp2", "dp1_to_dp2_zero2"])
def test_reshard_continues_the_original_trajectory(nproc, layout, config, halfway, tmp_path):
    stopped, reference = halfway
    target = tmp_path / "resharded"
    convert("reshard", stopped, "--output", target, "--nproc", nproc, *layout)
    result = run_trainer(target / "config.yaml", "--resume", nproc=nproc)
    assert f"resuming at step {HALFWAY}" in result.stdout and "rows sharded over 2 ranks" in result.stdout
    losses, expected = metrics(target, "train/loss"), metrics(reference, "train/loss")
    assert sorted(losses) == list(range(HALFWAY + 1, EQUIVALENCE_STEPS + 1))
    assert abs(losses[HALFWAY + 1] - expected[HALFWAY + 1]) <= 1e-5 * abs(expected[HALFWAY + 1])
    assert_losses_close(losses, {step: expected[step] for step in losses}, rtol=1e-5)

    # The resharded checkpoint holds exactly the original weights and AdamW state.
    convert("consolidate", stopped, "--output", tmp_path / "before", "--with-optimizer")
    convert("consolidate", target / "checkpoints" / f"step_{HALFWAY:08d}", "--output", tmp_path / "after",
            "--with-optimizer")
    before, after = Consolidated(tmp_path / "before"), Consolidated(tmp_path / "after")
    assert before.optimizer_step == after.optimizer_step == HALFWAY
    weights, moments = after.state_dict(), after.moments()
    for name, value in before.state_dict().items():
        assert torch.equal(weights[name], value), name
    for key, values in before.moments().items():
        assert values and all(torch.equal(moments[key][name], value) for name, value in values.items()), key


def test_reshard_weights_only_warns_and_restarts_the_optimizer(halfway, tmp_path):
    """Zero moments, but the run's step and learning-rate schedule go on where they were."""
    stopped, reference = halfway
    result = convert("reshard", stopped, "--output", tmp_path / "fresh", "--nproc", 1, "--weights-only")
    assert "warning: --weights-only" in result.stderr
    convert("consolidate", tmp_path / "fresh", "--output", tmp_path / "plain", "--with-optimizer")
    plain = Consolidated(tmp_path / "plain")
    assert plain.step == HALFWAY
    assert all(not value.any() for value in plain.moments()["exp_avg"].values())
    resumed = run_trainer(tmp_path / "fresh" / "config.yaml", "--resume")
    assert f"resuming at step {HALFWAY}" in resumed.stdout
    rates, expected = metrics(tmp_path / "fresh", "train/lr"), metrics(reference, "train/lr")
    assert sorted(rates) == list(range(HALFWAY + 1, EQUIVALENCE_STEPS + 1))
    assert rates == {step: expected[step] for step in rates}


def test_bad_inputs_are_one_line_and_write_nothing(trained, halfway, tmp_path):
    run_dir = trained("tp2_dp2_zero2_rows")
    checkpoint = next((run_dir / "checkpoints").glob("step_*"))
    out = tmp_path / "out"

    missing = tmp_path / "missing" / checkpoint.name
    shutil.copytree(checkpoint, missing)
    (missing / "l3_rows_rank00001.pt").unlink()
    assert "l3_rows_rank00001.pt is missing" in refused("consolidate", missing, "--output", out)

    corrupt = tmp_path / "corrupt" / checkpoint.name
    shutil.copytree(checkpoint, corrupt)
    victim = corrupt / "mp_rank_01_model_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert "mp_rank_01_model_states.pt has CRC-32" in refused("consolidate", corrupt, "--output", out)

    assert "feed_forward.w1.weight has shape" in refused("consolidate", checkpoint, "--output", out,
                                                         "model.ffn_hidden_size=64")

    convert("consolidate", halfway[0], "--output", tmp_path / "plain")
    extra = tmp_path / "extra"
    plain = Consolidated(tmp_path / "plain")
    from l3train.checkpoint.consolidated import ConsolidatedContents, write_consolidated

    tensors = {**plain.state_dict(), "blocks.0.attention.wz.weight": torch.zeros(2, 2)}
    write_consolidated(extra, ConsolidatedContents(plain.config, plain.step, {}), tensors.items())
    assert "unknown tensor blocks.0.attention.wz.weight" in refused("reshard", extra, "--output", out, "--nproc", 1,
                                                                    "--weights-only")
    assert "has no optimizer state" in refused("reshard", extra, "--output", out, "--nproc", 1)
    assert "already exists" in refused("consolidate", checkpoint, "--output", tmp_path / "plain")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_reshard_of_a_run_with_relative_paths_takes_the_path_overrides(config, tmp_path):
    """A run whose config names its tokenizer and allocation relative to where it was trained,
    resharded from another directory with the paths repointed (the consolidation inside the
    reshard once ignored them and failed on every retry)."""
    tree = yaml.safe_load(config.read_text())
    tokenizer, allocation, prefixes = tree["data"]["tokenizer"], tree["l3"]["allocation"], tree["data"]["prefixes"]
    tree["data"]["tokenizer"] = os.path.relpath(tokenizer, REPO)
    tree["l3"]["allocation"] = os.path.relpath(allocation, REPO)
    tree["data"]["prefixes"] = [os.path.relpath(prefix, REPO) for prefix in prefixes]
    relative = tmp_path / "relative.yaml"
    relative.write_text(yaml.safe_dump(tree))
    run_trainer(relative, f"run_dir={tmp_path / 'run'}", "training.steps=2")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([*CONVERT, "reshard", str(tmp_path / "run"), "--output", str(tmp_path / "resharded"),
                             "--nproc", "1", "--weights-only", f"data.tokenizer={tokenizer}",
                             f"l3.allocation={allocation}", f"data.prefixes=[{','.join(prefixes)}]"],
                            cwd=elsewhere, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resharded = yaml.safe_load((tmp_path / "resharded" / "config.yaml").read_text())
    assert (resharded["data"]["tokenizer"], resharded["l3"]["allocation"]) == (tokenizer, allocation)
