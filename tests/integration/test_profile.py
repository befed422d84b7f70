"""`training.profile_steps`: a profiled range of steps leaves a Chrome trace and the time per
phase on every rank, including the sharded rows' all-to-all."""

from __future__ import annotations

import json

import pytest
from training_harness import run_trainer, tiny_l3_config, write_config


@pytest.mark.slow
def test_profiled_steps_give_a_trace_and_phase_times_per_rank(tmp_path, tiny_corpus, tiny_allocation):
    tree = tiny_l3_config(tmp_path / "run", tiny_corpus, tiny_allocation)
    tree["training"].update(steps=4, eval_interval=100, profile_steps=[1, 3])
    config = write_config(tmp_path / "config.yaml", tree)
    result = run_trainer(config, nproc=2)
    assert "profile of steps 1-2 (rank 0, ms per step): data" in result.stdout
    for rank in range(2):
        trace = json.loads((tmp_path / "run" / "profile" / f"trace_rank{rank:05d}.json").read_text())
        assert any(event.get("name") == "forward" for event in trace["traceEvents"])
        phases = json.loads((tmp_path / "run" / "profile" / f"phases_rank{rank:05d}.json").read_text())
        assert phases["steps"] == [1, 3]
        host = {name: times["host"] for name, times in phases["ms_per_step"].items()}
        assert all(host[name] > 0 for name in ("data", "forward", "backward", "optimizer", "all_to_all")), host
        # The exchange happens inside forward and backward.
        assert host["all_to_all"] < host["forward"] + host["backward"]
