"""L³ rows partitioned over TP, DP and TP×DP (gloo ranks) against the unsharded layer.

The 2-rank cases (DP=2 and TP=2) share one world of the worker; the 4-rank case has its own.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from training_harness import REPO, free_port, trainer_env

WORKER = Path(__file__).parent / "workers" / "sharded_l3_worker.py"
CASES = {"dp2": (2, "1:tied"), "tp2": (2, "2:untied"), "tp2xdp2": (4, "2:tied")}  # id: (ranks, TP:kv)


def run_world(nproc: int, report_dir: Path) -> None:
    cases = [case for ranks, case in CASES.values() if ranks == nproc]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
         "127.0.0.1", "--master_port", str(free_port()), str(WORKER), str(report_dir), *cases],
        cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[int, Path]:
    """The report directory of each world size, its world run on first use."""
    made: dict[int, Path] = {}

    def of(nproc: int) -> Path:
        if nproc not in made:
            made[nproc] = tmp_path_factory.mktemp(f"sharded_l3_{nproc}_ranks")
            run_world(nproc, made[nproc])
        return made[nproc]

    return of


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_rows_match_full_layer(name, reports):
    nproc, case = CASES[name]
    case_dir = reports(nproc) / case.replace(":", "_")
    ranks = [json.loads(path.read_text()) for path in sorted(case_dir.glob("rank*.json"))]
    assert len(ranks) == nproc and not any(r["failures"] for r in ranks), [r["failures"] for r in ranks]
    # Every row is stored exactly once across ranks, each rank ≈ 1/(TP·DP) of them.
    assert sum(r["rows_stored"] for r in ranks) == ranks[0]["rows_total"]
    mean = ranks[0]["rows_total"] / nproc
    assert max(r["rows_stored"] for r in ranks) <= mean * ranks[0]["rows_max_over_mean"] + 1e-9
