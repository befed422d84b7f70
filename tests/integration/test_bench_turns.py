"""tools/bench.py's training throughput: real trainers, alive side by side, taking turns."""

from __future__ import annotations

import json
import subprocess

import pytest
from training_harness import tiny_l3_config, write_config

from l3train.benchmarks.training import WARMUP_STEPS, measure_throughput
from l3train.errors import L3TrainError


def tiny_configs(tmp_path, corpus, allocation) -> tuple[str, str]:
    """A tiny L³ model on the test corpus, and the same backbone without L³ layers."""
    tree = tiny_l3_config(tmp_path / "unused", corpus, allocation)
    l3 = write_config(tmp_path / "l3.yaml", tree)
    tree["l3"] = {"after_blocks": []}
    return str(l3), str(write_config(tmp_path / "dense.yaml", tree))


def test_models_take_turns_and_each_turn_counts_all_its_steps_but_the_first(monkeypatch, tmp_path, tiny_corpus,
                                                                             tiny_allocation):
    import tempfile

    l3_config, dense_config = tiny_configs(tmp_path, tiny_corpus, tiny_allocation)
    # Keep the scratch directory to read the runs' own logs afterwards.
    monkeypatch.setattr(tempfile, "TemporaryDirectory", lambda prefix: _Kept(tmp_path))
    lines: list[str] = []
    l3, dense = measure_throughput([l3_config, dense_config], 1, 3, 2, [], lines.append)
    assert lines == ["  1 rank(s), turn 1/2 done", "  1 rank(s), turn 2/2 done"]
    for result, run in ((l3, tmp_path / "m0"), (dense, tmp_path / "m1")):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        logged = {row["step"]: row["train/tokens_per_s"] for row in rows if "train/tokens_per_s" in row}
        assert sorted(logged) == list(range(1, WARMUP_STEPS + 2 * 3 + 1))  # every step, as training logs it
        # Turn 1 is steps 4-6, turn 2 steps 7-9; each turn's figure is the median of its steps 2 and 3.
        assert result.tokens_per_s == [(logged[5] + logged[6]) / 2, (logged[8] + logged[9]) / 2]
        assert len(result.runs) == 2 and all(run["peak_memory_gib"] > 0 for run in result.runs)
    assert "l3_entropy" in (tmp_path / "m0_rank0.log").read_text()  # the L³ model is the first


def test_a_model_that_cannot_start_is_reported_by_its_own_error_line(tmp_path, tiny_corpus, tiny_allocation):
    _, dense_config = tiny_configs(tmp_path, tiny_corpus, tiny_allocation)
    with pytest.raises(L3TrainError, match=r"^benchmark run of configs/none.yaml on 1 rank\(s\) failed: rank 0: "
                                           r"config file configs/none.yaml not found; pass one of the files in "
                                           r"configs/$"):
        measure_throughput(["configs/none.yaml", dense_config], 1, 2, 1, [])
    # The other model, started beside it, was ended with it.
    left = subprocess.run(["pgrep", "-f", f"l3train.benchmarks.turns --config {dense_config}"],
                          capture_output=True, text=True)
    assert left.stdout == "", left.stdout


def test_a_rank_that_dies_between_turns_fails_the_measurement_at_once(tmp_path, tiny_corpus, tiny_allocation):
    # Its peer may wait for it in a collective: the parent must not wait for the peer first.
    from l3train.benchmarks.turns import ModelRanks

    _, dense_config = tiny_configs(tmp_path, tiny_corpus, tiny_allocation)
    with ModelRanks(dense_config, 2, tmp_path / "m0", [], tmp_path) as model:
        model.wait_for("ready")
        model.train(1)  # 2 ranks started by hand (rendezvous, rank environment) train together
        assert '"step": 1' in (tmp_path / "m0" / "metrics.jsonl").read_text()
        model.processes[1].kill()
        model.processes[1].wait()
        with pytest.raises(L3TrainError, match=rf"^benchmark run of {dense_config} on 2 rank\(s\) failed: rank 1: "):
            model.train(1)
    assert all(process.returncode is not None for process in model.processes)


class _Kept:
    def __init__(self, path) -> None:
        self.path = path

    def __enter__(self) -> str:
        return str(self.path)

    def __exit__(self, *exc) -> None:
        return None
