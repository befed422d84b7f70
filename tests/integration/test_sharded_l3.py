"""L³ rows partitioned over TP, DP and TP×DP (gloo ranks) against the unsharded layer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from training_harness import REPO, free_port, trainer_env

WORKER = Path(__file__).parent / "workers" / "sharded_l3_worker.py"


@pytest.mark.slow
@pytest.mark.parametrize("nproc,tp,kv", [(2, 1, "tied"), (2, 2, "untied"), (4, 2, "tied")],
                         ids=["dp2", "tp2", "tp2xdp2"])
def test_sharded_rows_match_full_layer(nproc, tp, kv, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
         "127.0.0.1", "--master_port", str(free_port()), str(WORKER), str(tp), kv, str(tmp_path)],
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert len(reports) == nproc and not any(r["failures"] for r in reports)
    # Every row is stored exactly once across ranks, each rank ≈ 1/(TP·DP) of them.
    assert sum(r["rows_stored"] for r in reports) == reports[0]["rows_total"]
    mean = reports[0]["rows_total"] / nproc
    assert max(r["rows_stored"] for r in reports) <= mean * reports[0]["rows_max_over_mean"] + 1e-9
