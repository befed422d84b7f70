"""The profiled steps' collective timings (l3train.trainer.collective_trace): the recorder on a
real one-rank gloo group, and the report's arithmetic by hand. The 2-rank trainer writes the
report in tests/integration/test_profile.py."""

from __future__ import annotations

import torch
import torch.distributed as dist

from l3train.trainer.collective_trace import CollectiveTrace, wait_report
from l3train.trainer.profiler import StepProfiler


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
    assert [[call[0] for call in step["collectives"]] for step in trace.steps] == [["all_reduce", "barrier"]] * 2
    for step in trace.steps:
        assert all(compute >= 0 and inside > 0 and group == (0,) for _, compute, inside, group in step["collectives"])
        assert step["after_ms"] >= 0


def test_an_asynchronous_collective_is_marked_as_its_launch_only(one_rank):
    trace = CollectiveTrace()
    trace.start()
    try:
        trace.step_begins()
        dist.all_reduce(torch.ones(3), async_op=True).wait()
        dist.all_reduce(torch.ones(3), group=None, async_op=False)
    finally:
        trace.stop()
    assert [call[0] for call in trace.steps[0]["collectives"]] == ["all_reduce (async: launch only)", "all_reduce"]


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
    assert [call[0] for call in trace.steps[0]["collectives"]] == ["barrier"]


def _step(collectives: list[tuple[str, float, float]], after: float, group: tuple[int, ...] = (0, 1)) -> dict:
    return {"collectives": [(*call, group) for call in collectives], "after_ms": after}


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


def test_the_transfer_is_the_least_time_within_each_group():
    """Four ranks in two groups (as the sharded rows' DP groups under TP=2): ranks 0 and 2
    spend 1 and 5 ms, ranks 1 and 3 spend 4 and 6 ms. Within each group the last to arrive
    spent the least (1 and 4): waiting 0, 4, 0 and 2 ms. Over all four ranks the least would be
    1 ms and rank 1, which waited for nobody, would seem to wait 3 ms."""
    times = {0: 1.0, 1: 4.0, 2: 5.0, 3: 6.0}
    groups = {0: (0, 2), 1: (1, 3), 2: (0, 2), 3: (1, 3)}
    per_rank = [[_step([("all_to_all_single", 2, times[r])], 0, groups[r])] for r in range(4)]
    lines = wait_report(per_rank)
    # mean in it 4; transfer per rank 1, 4, 1, 4 (mean 2.5); waiting 0, 0, 4, 2 (mean 1.5, most 4).
    assert "| 0 | all_to_all_single | 2.00 | 4.00 | 2.50 | 1.50 | 4.00 |" in lines


def test_a_profiled_range_the_run_never_finishes_is_dropped_with_one_line(one_rank, tmp_path):
    logged: list[str] = []
    profiler = StepProfiler([1, 5], str(tmp_path), rank=0, device=torch.device("cpu"), log=logged.append)
    for step in range(3):  # the run stops after step index 2 (a stop signal, --exit-after-steps)
        profiler.step_begins(step)
        torch.ones(4).sum()
        profiler.step_ends(step + 1)
    profiler.close()
    assert logged == ["profile of steps 1-4 not written: the run stopped before step 5 (training.profile_steps)"]
    assert profiler.profiler is None and not (tmp_path / "profile").exists()
    profiler.close()  # once is enough
    assert len(logged) == 1
