"""tools/inspect_checkpoint.py on real checkpoints: one written by the trainer (2 steps), and
a consolidated one written by `write_consolidated` from the model its config builds."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from l3train.allocation.allocation import Allocation
from l3train.checkpoint.consolidated import ConsolidatedContents, plain_state_dict, write_consolidated
from l3train.checkpoint.inspect import describe_checkpoint, format_report
from l3train.checkpoint.manifest import read_manifest
from l3train.config import config_from_dict
from l3train.errors import L3TrainError
from l3train.parallel.shard_plan import allocation_hash
from training_harness import REPO, trainer_env

pytestmark = pytest.mark.slow  # the trainer run and DeepSpeed

TOOL = REPO / "tools" / "inspect_checkpoint.py"
STEPS = 12  # the shared tiny_l3 run's last step
SAFETENSORS_DTYPES = {"float32": "F32", "int64": "I64"}


def inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=REPO, env=trainer_env(),
                          capture_output=True, text=True, timeout=120)


def flip_middle_bytes(path: Path) -> None:
    """Overwrite 16 bytes in the middle of `path` with their complement (size unchanged)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(255 - b for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def run_dir(shared_runs) -> Path:
    """A run of the real trainer: the session's tiny L³ run, whose latest checkpoint is step 12."""
    return shared_runs.get("tiny_l3").run_dir


@pytest.fixture(scope="module")
def checkpoint(run_dir) -> Path:
    return run_dir / "checkpoints" / f"step_{STEPS:08d}"


@pytest.fixture(scope="module")
def consolidated(checkpoint, tmp_path_factory) -> Path:
    """A consolidated checkpoint of the plain model the training checkpoint's config builds,
    split into model shards of at most 1 MB (the L³ key table alone is 1 MB)."""
    from l3train.model.build import build_model

    cfg = config_from_dict(yaml.safe_load((checkpoint / "config.yaml").read_text()))
    model, _ = build_model(cfg)
    manifest, _ = read_manifest(checkpoint)
    source = {"checkpoint": str(checkpoint), "world": manifest["world"], "allocation_hash": manifest["allocation_hash"]}
    contents = ConsolidatedContents(config=cfg, step=STEPS, source=source)
    state = plain_state_dict(model, cfg.model.tie_embeddings)
    return write_consolidated(tmp_path_factory.mktemp("consolidated") / "model", contents, state.items(),
                              max_shard_bytes=1 << 20)


def expected_allocation_line(path: Path) -> str:
    allocation = Allocation.load(path)
    rows = allocation.rows_per_token
    return (f"vocab {allocation.vocab_size:,}, v {allocation.budget_v:,} rows, k {allocation.cap_k} (cap); "
            f"rows per token min {rows.min()}, mean {rows.mean():.2f}, median {np.median(rows):g}, "
            f"max {rows.max()}")


def test_training_checkpoint_report(run_dir, checkpoint, tiny_allocation):
    from l3train.model.build import build_model

    result = inspect(run_dir)  # the run_dir: its `latest` checkpoint
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    cfg = config_from_dict(yaml.safe_load((checkpoint / "config.yaml").read_text()))
    manifest, _ = read_manifest(checkpoint)
    assert out.startswith(f"checkpoint {checkpoint} (training)\n")
    tokens = STEPS * cfg.training.global_batch_size * cfg.data.seq_length
    assert f"step {STEPS}, tokens seen {tokens:,}\n" in out
    assert "layout: 1 rank(s) (TP 1 × DP 1, EP 1), ZeRO-0, L³ rows not sharded, experts not split\n" in out
    assert "precision: fp32\n" in out
    assert "L³ after blocks [0] (d_emb 64, d_up 128), no MoE blocks" in out
    params = sum(p.numel() for p in build_model(cfg)[0].parameters())
    assert f"parameters: {params:,} (" in out
    rows = Allocation.load(tiny_allocation).rows_per_token
    assert f"mode lzw, hash {allocation_hash(rows)} (as the checkpoint records)" in out
    assert expected_allocation_line(tiny_allocation) in out
    megabytes = sum(entry["size"] for entry in manifest["files"].values()) / 1e6
    assert f"manifest: OK ({len(manifest['files'])} files, {megabytes:.1f} MB)" in out
    assert "tensors:" not in out


def test_tensor_table_of_a_training_checkpoint(checkpoint):
    import torch

    result = inspect(checkpoint, "--tensors")
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("tensors:\n")[1]
    assert table.splitlines()[0].strip().startswith("mp_rank_00_model_states.pt (")
    assert re.search(r"^ +lookups\.0\.lookup\.up\.weight +\[128, 64\] +float32$", table, re.MULTILINE), table
    module = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    for name, tensor in module.items():
        assert re.search(rf"^ +{re.escape(name)} +\[{', '.join(map(str, tensor.shape))}\] +"
                         rf"{str(tensor.dtype).removeprefix('torch.')}$", table, re.MULTILINE), name
    assert len([line for line in table.splitlines() if line.startswith("    ")]) == len(module)


def test_json_report(checkpoint, tiny_allocation):
    result = inspect(checkpoint, "--json", "--tensors")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    manifest, _ = read_manifest(checkpoint)
    assert (report["kind"], report["step"], report["layout"]) == ("training", STEPS, manifest["world"])
    assert report["manifest"]["status"] == "ok"
    allocation = Allocation.load(tiny_allocation)
    assert report["allocation"]["budget_v"] == allocation.budget_v
    assert report["allocation"]["median_rows"] == float(np.median(allocation.rows_per_token))
    assert report["model"]["l3_after_blocks"] == [0]
    (model_file,) = report["tensor_files"]
    shapes = {tensor["name"]: tensor["shape"] for tensor in model_file["tensors"]}
    assert shapes["lookups.0.lookup.rows.key_table"] == [allocation.budget_v, 64]


def test_corrupted_file_fails_verification(checkpoint, tmp_path):
    copy = shutil.copytree(checkpoint, tmp_path / checkpoint.name)
    flip_middle_bytes(copy / "mp_rank_00_model_states.pt")
    result = inspect(copy)
    assert result.returncode == 1, result.stderr
    assert f"manifest: FAILED: {copy / 'mp_rank_00_model_states.pt'} has CRC-32" in result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: checkpoint {copy} does not verify: ") and "mp_rank_00_model_states.pt" in line
    unchecked = describe_checkpoint(copy, verify=False)
    assert unchecked.ok
    assert "manifest: not verified (--no-verify; 2 files," in format_report(unchecked)


def test_truncated_file_is_named_and_its_tensors_unreadable(checkpoint, tmp_path):
    copy = shutil.copytree(checkpoint, tmp_path / checkpoint.name)
    model_states = copy / "mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:1000])
    report = describe_checkpoint(copy, tensors=True)
    assert not report.ok
    assert report.manifest.problem == (f"{model_states} has 1000 bytes, the manifest records "
                                       f"{(checkpoint / model_states.name).stat().st_size} (truncated or overwritten)")
    (model_file,) = report.tensor_files
    assert model_file.tensors == [] and model_file.problem.startswith("unreadable (")


def test_checkpoint_without_manifest_is_incomplete(checkpoint, tmp_path):
    copy = shutil.copytree(checkpoint, tmp_path / checkpoint.name)
    (copy / "manifest.json").unlink()
    report = describe_checkpoint(copy)
    assert not report.ok and report.manifest.problem.startswith(f"{copy / 'manifest.json'} is missing")
    assert (report.kind, report.step, report.layout) == ("training", STEPS, None)
    assert "layout: not recorded" in format_report(report)


def test_missing_allocation_is_one_line(checkpoint, tmp_path):
    copy = shutil.copytree(checkpoint, tmp_path / checkpoint.name)
    tree = yaml.safe_load((copy / "config.yaml").read_text())
    tree["l3"]["allocation"] = str(tmp_path / "elsewhere" / "allocation.npz")
    (copy / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    report = describe_checkpoint(copy, verify=False)
    assert report.ok and report.allocation is None and report.model.total_params is None
    text = format_report(report)
    assert [line for line in text.splitlines() if line.startswith("allocation")] == [
        f"allocation: l3.allocation {tmp_path / 'elsewhere' / 'allocation.npz'} is not on this machine: "
        f"no allocation statistics"]
    assert "parameters: unknown" in text
    # Editing config.yaml is itself a change the manifest catches.
    assert describe_checkpoint(copy).manifest.problem.startswith(f"{copy / 'config.yaml'} has ")


def test_not_a_checkpoint_is_a_user_error(tmp_path):
    result = inspect(tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {tmp_path} is not a checkpoint")
    with pytest.raises(L3TrainError, match="not found"):
        describe_checkpoint(tmp_path / "missing")
    (tmp_path / "config.yaml").write_text("{}")  # a run_dir before its first checkpoint
    with pytest.raises(L3TrainError, match="is not a checkpoint"):
        describe_checkpoint(tmp_path)


def test_consolidated_checkpoint(consolidated, checkpoint, tiny_allocation, tmp_path):
    import torch
    from safetensors.torch import load_file

    result = inspect(consolidated, "--tensors")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"checkpoint {consolidated} (consolidated)\n")
    assert f"step {STEPS}, tokens seen " in out
    assert "trained in layout: 1 rank(s) (TP 1 × DP 1, EP 1), ZeRO-0, L³ rows not sharded, experts not split\n" in out
    rows = Allocation.load(tiny_allocation).rows_per_token
    assert f"source: checkpoint {checkpoint}, allocation_hash {allocation_hash(rows)}\n" in out
    assert (f"allocation {consolidated / 'allocation.npz'}: mode lzw, hash {allocation_hash(rows)} "
            f"(as the checkpoint records)\n") in out
    assert expected_allocation_line(tiny_allocation) in out
    assert "manifest: OK (" in out

    report = describe_checkpoint(consolidated, tensors=True)
    shards = sorted(path.name for path in consolidated.glob("model-*.safetensors"))
    assert len(shards) >= 2 and [entry.file for entry in report.tensor_files] == shards
    stored = {}
    for name in shards:
        stored.update(load_file(consolidated / name))
    listed = {tensor.name: (list(tensor.shape), tensor.dtype) for entry in report.tensor_files
              for tensor in entry.tensors}
    assert listed == {name: (list(tensor.shape), SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")])
                      for name, tensor in stored.items()}
    assert listed["lookups.0.lookup.up.weight"] == ([128, 64], "F32")
    assert report.model.total_params == sum(t.numel() for t in stored.values() if t.dtype == torch.float32)

    # The table comes from the headers: corrupt tensor data leaves it whole, the manifest fails.
    copy = shutil.copytree(consolidated, tmp_path / "model")
    flip_middle_bytes(copy / shards[0])
    damaged = describe_checkpoint(copy, tensors=True)
    assert not damaged.ok and f"{shards[0]} has CRC-32" in damaged.manifest.problem
    assert damaged.tensor_files == report.tensor_files
