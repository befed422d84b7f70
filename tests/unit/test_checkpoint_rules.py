"""Checkpoint manifests (every corruption named), retention, and which config keys may change on resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from l3train.checkpoint.config_change import FREE_KEYS, check_config_change, is_fixed
from l3train.checkpoint.manifest import MANIFEST, checkpoint_files, checksum, read_manifest, verify, write_manifest
from l3train.checkpoint.store import _prune
from l3train.config import Config
from l3train.errors import L3TrainError


def _checkpoint(directory: Path, sizes: dict[str, int]) -> Path:
    directory.mkdir(parents=True)
    for name, size in sizes.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(os.urandom(size))
    files = {name: checksum(directory / name, sync=True) for name in checkpoint_files(directory)}
    write_manifest(directory, {"step": 1, "tag": directory.name}, files)
    return directory


FILES = {"mp_rank_00_model_states.pt": 300_000, "zero/optim_states.pt": 50_000, "config.yaml": 100}


def test_a_written_checkpoint_verifies_and_lists_every_file(tmp_path):
    directory = _checkpoint(tmp_path / "step_00000001", FILES)
    assert verify(directory) is None
    manifest, problem = read_manifest(directory)
    assert problem is None and sorted(manifest["files"]) == sorted(FILES)
    assert manifest["files"]["config.yaml"]["size"] == 100
    # Split over 3 "ranks", every file is checked by exactly one share.
    assert all(verify(directory, share, 3) is None for share in range(3))


def _overwrite_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,expected", [
    (_overwrite_middle, "has CRC-32"),
    (lambda path: path.write_bytes(path.read_bytes()[:-1]), "bytes, the manifest records"),
    (lambda path: path.unlink(), "is missing"),
], ids=["64_bytes_overwritten", "truncated", "deleted"])
def test_every_damage_is_named_with_the_file(tmp_path, damage, expected):
    directory = _checkpoint(tmp_path / "step_00000001", FILES)
    victim = directory / "mp_rank_00_model_states.pt"
    damage(victim)
    problem = verify(directory)
    assert expected in problem and str(victim) in problem
    # Only the share that holds the file finds it.
    assert sum(verify(directory, share, 3) is not None for share in range(3)) == 1


def test_a_missing_or_foreign_manifest_is_named(tmp_path):
    directory = _checkpoint(tmp_path / "step_00000001", FILES)
    (directory / MANIFEST).write_text("{not json")
    assert "unreadable" in verify(directory)
    (directory / MANIFEST).write_text('{"format": "something else"}')
    assert "not an l3train checkpoint manifest" in verify(directory)
    (directory / MANIFEST).unlink()
    assert "manifest.json is missing" in verify(directory)


def test_retention_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3):
        _checkpoint(tmp_path / f"step_{step:08d}", FILES)
    (tmp_path / "step_00000004").mkdir()  # incomplete: no manifest
    (tmp_path / "step_00000003" / "config.yaml").write_bytes(b"short")  # a size no longer as recorded
    _prune(tmp_path, keep_last=1, keep="step_00000004")
    # step 3 does not count as complete, so step 2 (the newest complete one) survives.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000004"]


def test_config_keys_are_fixed_trajectory_or_free():
    assert is_fixed("model.d_model") and is_fixed("l3.d_up") and is_fixed("parallel.tensor_parallel")
    assert not is_fixed("l3.lr") and not is_fixed("training.steps") and not is_fixed("l3.allocation")
    saved = Config().to_dict()
    current = Config().to_dict()
    current["training"]["eval_interval"] = 7
    current["checkpoint"]["keep_last"] = 9
    current["run_dir"] = "elsewhere"
    assert check_config_change(saved, current, "ckpt", allow_trajectory_change=False) == []
    current["training"]["steps"] = 400
    current["optimizer"]["lr"] = 1e-4
    with pytest.raises(L3TrainError, match=r"optimizer.lr: 0.003 -> 0.0001; training.steps: 200 -> 400 would change "
                                           r"the training trajectory.*--allow-config-change"):
        check_config_change(saved, current, "ckpt", allow_trajectory_change=False)
    assert check_config_change(saved, current, "ckpt", allow_trajectory_change=True) == [
        "optimizer.lr: 0.003 -> 0.0001", "training.steps: 200 -> 400"]
    current["model"]["n_layers"] = 3
    with pytest.raises(L3TrainError, match=r"written with model.n_layers=4 but the config has 3"):
        check_config_change(saved, current, "ckpt", allow_trajectory_change=True)


def test_every_free_key_exists_and_new_keys_default_to_trajectory():
    from l3train.checkpoint.config_change import _flatten

    keys = set(_flatten(Config().to_dict()))
    assert FREE_KEYS <= keys
    trajectory = {key for key in keys if not is_fixed(key) and key not in FREE_KEYS}
    assert {"training.seed", "training.global_batch_size", "training.micro_batch_size", "data.prefixes",
            "data.weights", "optimizer.lr", "optimizer.warmup_steps", "training.steps"} <= trajectory


def test_resume_refuses_a_checkpoint_of_another_zero_stage_or_data_parallel_size(tmp_path):
    """DeepSpeed's files depend on the stage it ran (fp32 at one data-parallel rank runs ZeRO-0
    whatever the config asks) and, from ZeRO-1 on, on the number of data-parallel ranks."""
    from l3train.checkpoint.store import _check_identity, run_identity
    from l3train.config import config_from_dict, validate_for_world

    def identity(ranks: int, *overrides: str) -> dict:
        return run_identity(validate_for_world(config_from_dict({}, list(overrides)), ranks), None, None)

    one_rank, two_ranks = identity(1, "parallel.zero_stage=1"), identity(2, "parallel.zero_stage=1")
    _check_identity(one_rank, identity(1, "parallel.zero_stage=1"), tmp_path)
    with pytest.raises(L3TrainError, match="written by DeepSpeed at ZeRO-0, this run runs ZeRO-1"):
        _check_identity(one_rank, two_ranks, tmp_path)
    with pytest.raises(L3TrainError, match="partitioned over 2 data-parallel ranks, this run has 4"):
        _check_identity(two_ranks, identity(4, "parallel.zero_stage=1"), tmp_path)
