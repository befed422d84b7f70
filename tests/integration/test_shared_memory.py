"""The shared-memory all-to-all (l3train.parallel.shared_memory) on 3 real gloo ranks of this host."""

import json
import subprocess
import sys
from pathlib import Path

from training_harness import REPO, free_port, run_trainer, tiny_l3_config, trainer_env, write_config

WORKER = Path(__file__).parent / "workers" / "shared_memory_worker.py"


def test_shared_memory_all_to_all_equals_gloo_and_fails_like_it(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(WORKER), str(tmp_path)],
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["failures"] == [], report["failures"]
        # Each rank alone in its /dev/shm: all refuse, say why, and leave nothing.
        private = report["private"]
        assert private["enabled"] is False and private["left"] == [], private
        assert any("all-to-alls stay with gloo" in w for w in private["warnings"]), private
        timeout, lost = report["timeout"], report["lost"]
        # Rank 1 sleeps 4 s: the 1 s timeout fires first, and names who was late.
        assert 0.9 < timeout["seconds"] < 3.5 and "timed out" in timeout["message"], timeout
        assert "rank 1 " in timeout["message"], timeout
        # Then rank 1 exits: noticed within a few 50 ms checks of its exit, not after the 60 s timeout.
        assert lost["seconds"] < 10 and "rank 1 " in lost["message"] and "exited" in lost["message"], lost
        assert report["left_in_shm"] == []  # every segment unlinked once mapped


def test_the_config_keeps_the_exchanges_on_gloo(tmp_path, tiny_corpus, tiny_allocation):
    """`parallel.shared_memory_exchange=false`: a 2-rank run with sharded rows exchanges through
    gloo and says so (the default, shared memory, is asserted by tests/integration/test_sharded_training.py)."""
    tree = tiny_l3_config(tmp_path / "run", tiny_corpus, tiny_allocation)
    tree["training"].update(steps=2, eval_interval=100)
    tree["parallel"]["shared_memory_exchange"] = False
    result = run_trainer(write_config(tmp_path / "config.yaml", tree), nproc=2)
    assert "L³ rows sharded over 2 ranks (exchanged through gloo)" in result.stdout
