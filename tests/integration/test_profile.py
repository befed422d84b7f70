"""`training.profile_steps`: a profiled range of steps leaves a Chrome trace and the time per
phase on every rank, including the sharded rows' all-to-all, and every collective's time
split into transfer and waiting for a later rank (gathered from both ranks)."""

from __future__ import annotations

import json
import re

import pytest
from training_harness import run_trainer, tiny_l3_config, write_config


@pytest.mark.slow
def test_profiled_steps_give_a_trace_and_phase_times_per_rank(tmp_path, tiny_corpus, tiny_allocation):
    tree = tiny_l3_config(tmp_path / "run", tiny_corpus, tiny_allocation)
    tree["training"].update(steps=5, eval_interval=100, profile_steps=[1, 4])
    tree["parallel"]["zero_stage"] = 1  # DeepSpeed's own all-gather of the parameters, too
    config = write_config(tmp_path / "config.yaml", tree)
    result = run_trainer(config, nproc=2)
    assert "profile of steps 1-3 (rank 0, ms per step): data" in result.stdout
    for rank in range(2):
        trace = json.loads((tmp_path / "run" / "profile" / f"trace_rank{rank:05d}.json").read_text())
        assert any(event.get("name") == "forward" for event in trace["traceEvents"])
        phases = json.loads((tmp_path / "run" / "profile" / f"phases_rank{rank:05d}.json").read_text())
        assert phases["steps"] == [1, 4]
        host = {name: times["host"] for name, times in phases["ms_per_step"].items()}
        assert all(host[name] > 0 for name in ("data", "forward", "backward", "optimizer", "all_to_all")), host
        # The exchange happens inside forward and backward.
        assert host["all_to_all"] < host["forward"] + host["backward"]
    report = (tmp_path / "run" / "profile" / "collectives.md").read_text().splitlines()
    # Every step logs (log_interval 1), with one all-reduce after the step: the last profiled
    # step's comes after the range, so the report takes the two others.
    assert re.match(r"2 rank\(s\), 2 of 3 profiled steps with the same \d+ collectives", report[0]), report[0]
    rows = [line.split(" | ") for line in report if line.startswith("| ") and line[2].isdigit()]
    names = [row[1] for row in rows]
    # The sharded rows (one L³ layer): the route's sizes and token ids, then positions out and
    # lookups back in forward, gradients in and back in backward.
    assert names.count("all_to_all_single") == 6, names
    assert "all_gather_into_tensor" in names and "all_reduce" in names, names
    for row in rows:  # every collective took time on both ranks; no computing is negative
        computing, inside, transfer, _, _ = (float(cell.strip(" |")) for cell in row[2:])
        assert computing >= 0 and 0 < transfer <= inside
    assert "collectives of steps 1-3: Per step, mean over ranks: " in result.stdout
