"""Resuming under the reliability rules: a damaged checkpoint is named with the newest older one
that verifies; extending a run keeps the steps already planned; trajectory changes need
--allow-config-change, which logs them and applies the new values."""

from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from training_harness import metrics, run_expecting_error, run_trainer, tiny_l3_config, write_config

from l3train.checkpoint import verify


@pytest.fixture(scope="module")
def constant_lr_config(tmp_path_factory, tiny_corpus, tiny_allocation) -> Path:
    """Constant learning rate: the schedule does not depend on training.steps, so only the data
    order could make an extended run differ from a longer one."""
    root = tmp_path_factory.mktemp("resume_rules")
    tree = tiny_l3_config(root / "run", tiny_corpus, tiny_allocation)
    tree["optimizer"].update(lr=2e-3, min_lr=2e-3, warmup_steps=0)
    return write_config(root / "config.yaml", tree)


@pytest.fixture(scope="module")
def whole_run(constant_lr_config) -> Path:
    """12 steps, checkpoints at 6 and 12."""
    run_trainer(constant_lr_config)
    return constant_lr_config.parent / "run"


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def _damaged_copy(whole_run: Path, tmp_path: Path, damage) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    shutil.copytree(whole_run, run_dir)
    newest = run_dir / "checkpoints" / "step_00000012"
    victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    damage(victim)
    return run_dir, victim


def _overwrite_64_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = b"\xab" * 64
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,expected", [(_overwrite_64_bytes, "CRC-32"), (Path.unlink, "is missing")],
                         ids=["64_bytes_overwritten", "file_deleted"])
def test_a_damaged_checkpoint_is_named_and_the_older_one_resumes(constant_lr_config, whole_run, tmp_path, damage,
                                                                 expected):
    run_dir, victim = _damaged_copy(whole_run, tmp_path, damage)
    before = _snapshot(run_dir)
    message = run_expecting_error("--config", str(constant_lr_config), f"run_dir={run_dir}", "--resume")
    assert str(victim) in message and expected in message
    assert "newest older checkpoint that verifies is step_00000006" in message
    assert _snapshot(run_dir) == before  # nothing touched
    # Following the advice resumes from step 6 and reproduces the uninterrupted steps 7-12.
    (run_dir / "checkpoints" / "latest").write_text("step_00000006\n")
    resumed = run_trainer(constant_lr_config, f"run_dir={run_dir}", "--resume")
    assert "resuming at step 6" in resumed.stdout
    assert metrics(run_dir, "train/loss") == metrics(whole_run, "train/loss")
    assert verify(run_dir / "checkpoints" / "step_00000012") is None  # rewritten whole


def test_extending_a_run_keeps_its_trajectory_and_changes_need_the_flag(constant_lr_config, whole_run, tmp_path):
    run_dir = tmp_path / "short"
    run_trainer(constant_lr_config, f"run_dir={run_dir}", "training.steps=6")
    before = _snapshot(run_dir)
    message = run_expecting_error("--config", str(constant_lr_config), f"run_dir={run_dir}", "--resume")
    assert "training.steps: 6 -> 12 would change the training trajectory" in message
    assert "--allow-config-change" in message
    assert _snapshot(run_dir) == before
    extended = run_trainer(constant_lr_config, f"run_dir={run_dir}", "--resume", "--allow-config-change")
    assert "config changed on resume (--allow-config-change): training.steps: 6 -> 12" in extended.stdout
    # The data of steps 7-12 does not depend on how long the run was first planned to be.
    assert metrics(run_dir, "train/loss") == metrics(whole_run, "train/loss")


def test_an_allowed_learning_rate_change_applies_from_the_resumed_step(constant_lr_config, tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(constant_lr_config, f"run_dir={run_dir}", "--exit-after-steps", "6")
    resumed = run_trainer(constant_lr_config, f"run_dir={run_dir}", "optimizer.lr=5e-4", "optimizer.min_lr=5e-4",
                          "--resume", "--allow-config-change")
    assert "optimizer.lr: 0.002 -> 0.0005" in resumed.stdout
    lrs = metrics(run_dir, "train/lr")
    assert lrs[6] == pytest.approx(2e-3) and lrs[7] == pytest.approx(5e-4) and lrs[12] == pytest.approx(5e-4)


@contextmanager
def small_filesystem(path: Path, size: int):
    """A tmpfs of `size` bytes at `path` (the test runs as root, as the SLURM tests do)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def test_a_full_disk_at_a_save_is_one_line_and_keeps_the_last_checkpoint(shared_runs, tiny_corpus, tiny_allocation,
                                                                         tmp_path):
    checkpoint_bytes = sum(path.stat().st_size for path in shared_runs.get("tiny_l3").checkpoint(6).iterdir())
    config = write_config(tmp_path / "l3.yaml", tiny_l3_config(tmp_path / "unused", tiny_corpus, tiny_allocation))
    args = ["training.steps=4", "checkpoint.save_interval=2", "--config", str(config)]
    # Room for a checkpoint and a half: step 2 is saved; step 4 is refused before anything is written.
    with small_filesystem(tmp_path / "room_for_one", checkpoint_bytes * 3 // 2 + 2_000_000) as disk:
        root = disk / "run" / "checkpoints"
        line = run_expecting_error(*args, f"run_dir={disk / 'run'}")
        assert line.startswith("error: not enough space to save checkpoint step_00000004: ") and " MB free on the " \
            f"filesystem of {root}, the last checkpoint took " in line, line
        assert f"{root / 'step_00000002'} is intact; free space" in line
        assert (root / "latest").read_text().strip() == "step_00000002" and not (root / ".staging").exists()
        assert verify(root / "step_00000002") is None
    # No room for one: the first save fails midway, and removes what it wrote.
    with small_filesystem(tmp_path / "too_small", checkpoint_bytes // 2) as disk:
        root = disk / "run" / "checkpoints"
        line = run_expecting_error(*args, f"run_dir={disk / 'run'}")
        assert line.startswith("error: saving checkpoint step_00000002 failed (rank 0: ") and \
            f"removed {root / '.staging'}, " in line and "no checkpoint was saved before" in line, line
        assert not (root / ".staging").exists() and not (root / "latest").exists()


def test_a_resume_removes_the_staging_of_a_save_that_was_killed(shared_runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(shared_runs.get("tiny_l3").run_dir, run_dir)
    staging = run_dir / "checkpoints" / ".staging"
    (staging / "step_00000013").mkdir(parents=True)
    (staging / "step_00000013" / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 3_000_000)
    result = run_trainer(run_dir / "config.yaml", f"run_dir={run_dir}", "--resume")
    assert f"removed {staging} (3 MB): the staging of a checkpoint save that did not finish" in result.stdout
    assert not staging.exists()
