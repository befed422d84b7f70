"""The exchange benchmark (l3train.benchmarks.exchange, part of tools/bench.py) on 2 real gloo ranks."""

from __future__ import annotations


def test_exchange_benchmark_measures_every_collective_on_two_ranks():
    from l3train.benchmarks.exchange import exchange_sizes, measure_exchanges, report_lines
    from l3train.config import load_config

    figures = measure_exchanges("configs/tiny_l3.yaml", 2, iterations=5, compute_ms=0.5)
    _, sizes = exchange_sizes(load_config("configs/tiny_l3.yaml", []), 2)
    assert (figures["world_size"], figures["backend"], figures["positions_per_rank"]) == (2, "gloo", 1024)
    assert figures["transport"] == "shared memory"  # as the trainer exchanges between ranks of one host
    assert figures["collectives_per_micro_batch"] == 2 + 4 * 2
    assert {name: {"rows": entry["rows"], "bytes": entry["bytes"]}
            for name, entry in figures["collectives"].items()} == sizes
    assert all(entry["median_ms"] > 0 and entry["backend_ms"] > 0 for entry in figures["collectives"].values())
    assert all(ms > 0 for ms in figures["overlap_ms"].values())
    lines = report_lines(figures)
    assert lines[0].startswith("| collective |") and len(lines) == 2 + len(sizes) + 2
    assert "10 collectives per micro-batch" in lines[-1]


def test_exchange_benchmark_refuses_a_config_without_sharded_rows():
    import pytest

    from l3train.benchmarks.exchange import measure_exchanges
    from l3train.errors import L3TrainError

    with pytest.raises(L3TrainError, match="configs/tiny_dense.yaml has no sharded L³ rows.*pass an L³ config"):
        measure_exchanges("configs/tiny_dense.yaml", 2, iterations=1)
