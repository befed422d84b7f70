"""A rank that hangs instead of dying (SIGSTOP) ends the job within the collective timeout,
with the rank that did not answer named. Its own module, not test_failures.py's: that one
runs last, beside unit tests only, and this test need not wait for it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil
import pytest
from training_harness import REPO, kill_tree, tiny_l3_config, trainer_command, trainer_env, wait_for_step, write_config


@pytest.fixture
def config(tmp_path, tiny_corpus, tiny_allocation) -> Path:
    return write_config(tmp_path / "config.yaml", tiny_l3_config(tmp_path / "run", tiny_corpus, tiny_allocation))


@pytest.mark.slow
def test_a_hung_rank_ends_every_process_within_the_collective_timeout(config, tmp_path):
    """SIGSTOP instead of SIGKILL: the stopped rank keeps its connections open, so only the
    collective timeout can end the wait. Every group the run created (megatron-core's,
    DeepSpeed's and l3train's own) must carry the configured one."""
    run_dir = tmp_path / "run"
    cmd = trainer_command(config, f"run_dir={run_dir}", "training.steps=100000", "checkpoint.save_interval=100000",
                          "training.eval_interval=100000", "training.log_interval=1",
                          "parallel.collective_timeout_minutes=0.25", nproc=2)
    log = (tmp_path / "out.log").open("w+")
    launcher = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_step(run_dir, 3, launcher)
        ranks = {int(p.environ()["RANK"]): p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if "RANK" in p.environ()}
        stopped_at = time.time()
        ranks[1].suspend()
        launcher.wait(timeout=150)
        elapsed = time.time() - stopped_at
        survivors = [p for p in ranks.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        kill_tree(launcher)
    log.seek(0)
    output = log.read()
    print(f"hung rank: every process gone {elapsed:.1f} s after SIGSTOP of rank 1 (timeout 15 s)")
    assert launcher.returncode != 0 and not survivors
    # The timeout, the survivors' 5 s roll call (l3train.distributed.lost_ranks), torchrun's 30 s
    # grace before it SIGKILLs the stopped rank, and slack for a loaded machine.
    assert elapsed < 15 + 5 + 30 + 25, output[-3000:]
    assert "error: rank 0: rank(s) 1 did not answer within the collective timeout (0.25 min)" in output, \
        output[-3000:]
