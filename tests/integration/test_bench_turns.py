"""tools/bench.py's training throughput: real trainers, alive side by side, taking turns."""

from __future__ import annotations

import json

import pytest

from l3train.benchmarks.training import WARMUP_STEPS, measure_throughput
from l3train.errors import L3TrainError


def test_models_take_turns_and_each_turn_counts_all_its_steps_but_the_first(monkeypatch, tmp_path):
    import tempfile

    # Keep the scratch directory to read the runs' own logs afterwards.
    monkeypatch.setattr(tempfile, "TemporaryDirectory", lambda prefix: _Kept(tmp_path))
    lines: list[str] = []
    l3, dense = measure_throughput(["configs/tiny_l3.yaml", "configs/tiny_dense.yaml"], 1, 3, 2, [], lines.append)
    assert lines == ["  1 rank(s), turn 1/2 done", "  1 rank(s), turn 2/2 done"]
    for result, run in ((l3, tmp_path / "m0"), (dense, tmp_path / "m1")):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        logged = {row["step"]: row["train/tokens_per_s"] for row in rows if "train/tokens_per_s" in row}
        assert sorted(logged) == list(range(1, WARMUP_STEPS + 2 * 3 + 1))  # every step, as training logs it
        # Turn 1 is steps 4-6, turn 2 steps 7-9; each turn's figure is the median of its steps 2 and 3.
        assert result.tokens_per_s == [(logged[5] + logged[6]) / 2, (logged[8] + logged[9]) / 2]
        assert len(result.runs) == 2 and all(run["peak_memory_gib"] > 0 for run in result.runs)


def test_a_model_that_cannot_start_is_reported_by_its_own_error_line():
    # The other model, started beside it, is ended with it.
    with pytest.raises(L3TrainError, match=r"^benchmark run of configs/none.yaml on 1 rank\(s\) failed: rank 0: "
                                           r"config file configs/none.yaml not found; pass one of the files in "
                                           r"configs/$"):
        measure_throughput(["configs/none.yaml", "configs/tiny_dense.yaml"], 1, 2, 1, [])


class _Kept:
    def __init__(self, path) -> None:
        self.path = path

    def __enter__(self) -> str:
        return str(self.path)

    def __exit__(self, *exc) -> None:
        return None
