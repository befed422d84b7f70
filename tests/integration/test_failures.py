"""Failures that must end cleanly: SIGKILLs while checkpoints are written never leave a
`latest` that does not verify and load; a rank that dies makes every process exit quickly,
non-zero, with the lost rank named."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from training_harness import REPO, run_trainer, stop_rank_one, tiny_l3_config, trainer_env, write_config

WORKERS = Path(__file__).parent / "workers"


@pytest.fixture
def config(tmp_path, tiny_corpus, tiny_allocation) -> Path:
    return write_config(tmp_path / "config.yaml", tiny_l3_config(tmp_path / "run", tiny_corpus, tiny_allocation))


@pytest.mark.slow
def test_twenty_sigkills_while_saving_never_break_latest(config, tmp_path):
    run_dir, report_path, seed = tmp_path / "run", tmp_path / "report.json", random.randrange(1 << 30)
    cmd = [sys.executable, str(WORKERS / "kill_during_save_worker.py"), str(config), str(run_dir), "20",
           str(report_path), str(seed)]
    result = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"seed {seed}\n" + result.stdout[-3000:] + result.stderr[-5000:]
    rounds = json.loads(report_path.read_text())["rounds"]
    assert len(rounds) == 20 and all(r["killed"] for r in rounds), rounds
    assert all(r["problem"] is None for r in rounds), rounds  # `latest` verifies after every kill
    # Each round's trainer resumed from the previous round's `latest` and saved after it: it loaded.
    assert all(r["first_save"] > (r["resumed_from"] or "") for r in rounds)
    assert sum(r["mid_save"] for r in rounds) >= 15, rounds  # the kills did land inside saves
    resumed = run_trainer(config, f"run_dir={run_dir}", "training.steps=100000", "--resume", "--exit-after-steps",
                          "1", "--allow-config-change")
    assert f"resuming at step {int(rounds[-1]['latest'].split('_')[1])}" in resumed.stdout


@pytest.mark.slow
def test_a_dead_rank_ends_every_process_within_a_minute(config, tmp_path):
    ran = stop_rank_one(config, tmp_path, "kill", wait=120)
    output, elapsed = ran.output, ran.seconds
    print(f"rank death: every process gone {elapsed:.1f} s after SIGKILL of rank 1")
    assert ran.returncode != 0 and not ran.survivors
    assert elapsed < 60, output[-3000:]
    # The survivor names the rank that is gone (torchrun's report may call the survivor's own
    # exit the first failure: it can come first).
    assert "error: rank 0: lost contact with rank(s) 1 during a collective" in output, output[-3000:]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\n\s*exitcode\s*: -9", output), output[-3000:]

