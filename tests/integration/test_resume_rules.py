"""Resuming under the reliability rules: a damaged checkpoint is named with the newest older one
that verifies; extending a run keeps the steps already planned; trajectory changes need
--allow-config-change, which logs them and applies the new values."""

from __future__ import annotations

import shutil
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
