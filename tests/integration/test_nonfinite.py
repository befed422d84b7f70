"""Non-finite loss on one rank: the step is skipped on every rank (dense weights, sharded L³
rows, experts untouched), counted and logged; a run of them stops the run; a checkpoint is
never written with non-finite weights. A stop signal on one rank: every rank stops after the
same step. Both agreements, with the rank-local rows' squared norm, travel in the step's one
all-reduce of the trainer; the monitor's logged scalars in one more. Runs the real Trainer
under torchrun (worker: workers/nonfinite_worker.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from training_harness import REPO, free_port, tiny_l3_config, trainer_env, write_config

WORKER = Path(__file__).parent / "workers" / "nonfinite_worker.py"
LAYOUTS = {  # (overrides, what holds the weights)
    "zero2_sharded_rows_and_experts": ["parallel.zero_stage=2", "moe.blocks=[1]", "moe.num_experts=4",
                                       "moe.expert_parallel=2"],
    "zero3_everything_in_deepspeed": ["parallel.zero_stage=3", "parallel.shard_l3_rows=false"],
}


def _run_worker(tmp_path: Path, tiny_corpus, tiny_allocation, mode: str, overrides: list[str]) -> tuple[list[dict], str]:
    tree = tiny_l3_config(tmp_path / "run", tiny_corpus, tiny_allocation)
    tree["training"]["steps"] = 6
    config = write_config(tmp_path / "config.yaml", tree)
    reports = tmp_path / "reports"
    reports.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), str(config), str(reports), mode, *overrides]
    result = subprocess.run(cmd, cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads((reports / f"rank{rank}.json").read_text()) for rank in range(2)], result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_non_finite_step_is_skipped_everywhere(layout, tmp_path, tiny_corpus, tiny_allocation):
    reports, _ = _run_worker(tmp_path, tiny_corpus, tiny_allocation, "skip", LAYOUTS[layout])
    for report in reports:
        steps = report["steps"]
        assert [s["skipped"] for s in steps] == [False, False, False, True, False, False]
        # Rank 0's own loss was finite, yet it skipped too: the ranks agree.
        assert [s["changed"] for s in steps] == [True, True, True, False, True, True]
        assert steps[-1]["skipped_steps"] == 1 and report["finite_weights"]
        # Rank 1 alone received the signal, before step index 4: both ranks stop after it.
        assert [s["stop"] for s in steps] == [False, False, False, False, True, True]
        assert [s["all_reduces"] for s in steps] == [1] * 6
        assert report["monitor"]["all_reduces"] == 1
        assert "refusing to save a checkpoint of step 6" in report["save_error"]
        assert "is not finite" in report["save_error"]
    assert not reports[0]["steps"][3]["loss_finite"] or not reports[1]["steps"][3]["loss_finite"]
    # What the monitor logs for the last step: the ranks' mean loss and entropies, the larger peak.
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [6]
    own = [report["monitor"] for report in reports]
    assert logged[0]["train/loss"] == pytest.approx((own[0]["own_loss"] + own[1]["own_loss"]) / 2, rel=1e-6)
    for block in own[0]["own_entropy"]:
        mean = (own[0]["own_entropy"][block] + own[1]["own_entropy"][block]) / 2
        assert logged[0][f"l3/entropy_after_block_{block}"] == pytest.approx(mean, rel=1e-6)
    assert logged[0]["train/peak_memory_gib"] == pytest.approx(max(o["own_peak"] for o in own), rel=1e-3)
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


@pytest.mark.slow
def test_too_many_non_finite_steps_in_a_row_stop_the_run(tmp_path, tiny_corpus, tiny_allocation):
    reports, stdout = _run_worker(tmp_path, tiny_corpus, tiny_allocation, "diverge",
                                  ["parallel.zero_stage=2", "training.max_skipped_steps=3"])
    for report in reports:
        assert report["error"].startswith("3 steps in a row (to step 5) had a non-finite loss or gradient")
        assert "training.max_skipped_steps=3" in report["error"]
    assert "step 3: non-finite loss or gradient" in stdout and "(1 in a row, 1 in total)" in stdout
    assert "(3 in a row, 3 in total)" in stdout
