"""The profiled steps' collective timings (l3train.trainer.collective_trace): the recorder on a
real one-rank gloo group, and the report's arithmetic by hand. The 2-rank trainer writes the
report in tests/integration/test_profile.py."""

from __future__ import annotations

import torch
import torch.distributed as dist

from l3train.trainer.collective_trace import CollectiveTrace, wait_report


def test_the_trace_records_each_collective_per_step_and_restores_torch(one_rank):
    original = dist.all_reduce
    trace = CollectiveTrace()
    trace.start()
    dist.all_reduce(torch.ones(3))  # before the first step: not recorded
    for _ in range(2):
        trace.step_begins()
        dist.all_reduce(torch.ones(3))
        dist.barrier()
    trace.stop()
    dist.all_reduce(torch.ones(3))  # after: not recorded
    assert dist.all_reduce is original
    assert [[name for name, _, _ in step["collectives"]] for step in trace.steps] == [["all_reduce", "barrier"]] * 2
    for step in trace.steps:
        assert all(compute >= 0 and inside > 0 for _, compute, inside in step["collectives"])
        assert step["after_ms"] >= 0


def test_nested_collectives_count_once(one_rank):
    trace = CollectiveTrace()
    trace.start()
    outer = dist.barrier

    def barrier_by_all_reduce(*args, **kwargs):  # a collective built on another one
        dist.all_reduce(torch.ones(1))
        return outer(*args, **kwargs)

    try:
        trace.step_begins()
        trace._timed("barrier", barrier_by_all_reduce)()
    finally:
        trace.stop()
    assert [name for name, _, _ in trace.steps[0]["collectives"]] == ["barrier"]


def _step(collectives: list[tuple[str, float, float]], after: float) -> dict:
    return {"collectives": collectives, "after_ms": after}


def test_the_report_splits_transfer_from_waiting_for_a_later_rank():
    """Two ranks, four steps: 0 and 1 alike on both (used), 2 a logging step with one more
    collective (not the common sequence), 3 with different collectives on the two ranks."""
    rank0 = [_step([("all_reduce", 10, 3), ("all_to_all_single", 1, 1)], 2),
             _step([("all_reduce", 12, 1), ("all_to_all_single", 1, 2)], 2),
             _step([("all_reduce", 10, 1), ("all_to_all_single", 1, 1), ("all_reduce", 1, 1)], 2),
             _step([("all_reduce", 10, 1)], 2)]
    rank1 = [_step([("all_reduce", 12, 1), ("all_to_all_single", 1, 2)], 4),
             _step([("all_reduce", 10, 3), ("all_to_all_single", 3, 1)], 4),
             _step([("all_reduce", 10, 1), ("all_to_all_single", 1, 1), ("all_reduce", 1, 1)], 2),
             _step([("broadcast", 10, 1)], 2)]
    lines = wait_report([rank0, rank1])
    assert lines[0] == "2 rank(s), 2 of 4 profiled steps with the same 2 collectives (ms per step):"
    # all_reduce: computing (10+12+12+10)/4 = 11; each rank's mean time 2; the least per step
    # is 1 both times; so 1 waiting on average, and 1 for the most waiting rank.
    assert "| 0 | all_reduce | 11.00 | 2.00 | 1.00 | 1.00 | 1.00 |" in lines
    # all_to_all_single: computing (1+1+1+3)/4 = 1.5; times 1.5 and 1.5; least 1 per step.
    assert "| 1 | all_to_all_single | 1.50 | 1.50 | 1.00 | 0.50 | 0.50 |" in lines
    # Computing 11 + 1.5 + after (2+2+4+4)/4 = 3; in collectives 3.5 = 2 transfer + 1.5 waiting.
    assert lines[-1] == ("Per step, mean over ranks: 15.5 ms computing (3.0 of it after the last collective), "
                         "3.5 ms in 2 collectives: 2.0 ms transfer, 1.5 ms waiting for a later rank (the most "
                         "waiting rank at each: 1.5 ms).")
    assert wait_report([[rank0[3]], [rank1[3]]]) == ["no step ran the same collectives on every rank"]
