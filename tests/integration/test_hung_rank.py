"""A rank that hangs instead of dying (SIGSTOP) ends the job within the collective timeout,
with the rank that did not answer named. Its own module, not test_failures.py's: that one
runs last, beside unit tests only, and this test need not wait for it."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_harness import stop_rank_one, tiny_l3_config, write_config


@pytest.fixture
def config(tmp_path, tiny_corpus, tiny_allocation) -> Path:
    return write_config(tmp_path / "config.yaml", tiny_l3_config(tmp_path / "run", tiny_corpus, tiny_allocation))


@pytest.mark.slow
def test_a_hung_rank_ends_every_process_within_the_collective_timeout(config, tmp_path):
    """SIGSTOP instead of SIGKILL: the stopped rank keeps its connections open, so only the
    collective timeout can end the wait. Every group the run created (megatron-core's,
    DeepSpeed's and l3train's own) must carry the configured one."""
    ran = stop_rank_one(config, tmp_path, "suspend", "parallel.collective_timeout_minutes=0.25")
    output, elapsed = ran.output, ran.seconds
    print(f"hung rank: every process gone {elapsed:.1f} s after SIGSTOP of rank 1 (timeout 15 s)")
    assert ran.returncode != 0 and not ran.survivors
    # The timeout, the survivors' 5 s roll call (l3train.distributed.lost_ranks), torchrun's 30 s
    # grace before it SIGKILLs the stopped rank, and slack for a loaded machine.
    assert elapsed < 15 + 5 + 30 + 25, output[-3000:]
    assert "error: rank 0: rank(s) 1 did not answer within the collective timeout (0.25 min)" in output, \
        output[-3000:]
