"""Where the profiled steps wait: every collective's time on every rank, split into transfer
and waiting for a later rank (`training.profile_steps` → run_dir/profile/collectives.md).

A collective returns on a rank once every rank of its group has reached it, so its time on
a rank is the transfer plus the wait for the latest rank of the group. The rank of the group
that spends the least time in it arrived last: its time is the transfer, and what the others
spend beyond that is time spent waiting for a later one. The split needs no clock shared by
the ranks (nodes need not agree on the time). Each call records its group's ranks, so
collectives over subgroups (a TP group, each DP group of the sharded rows) are split within
their own group.

Why it matters: the same work takes a little longer or shorter on each rank (other
processes, interrupts, caches), and each collective makes every rank wait for the slowest
since the previous one. The more collectives split a step's compute, the more of that spread
is paid: the sharded L³ rows exchange positions four times per layer and step
(l3train.parallel.sharded_l3), a dense model's data parallelism once per step.

How: while tracing, the torch.distributed collectives are wrapped where callers look them
up (`dist.all_reduce(...)`, as l3train, DeepSpeed and megatron-core call them), and so are
those that DeepSpeed's communication backend and megatron-core's sequence-parallel mappings
keep references to from their import (all-gathers and reduce-scatters), and l3train's own
all-to-all, which may not reach torch.distributed at all (shared memory). A step's collectives
are those from its start to the next step's (its logging comes after it; the last profiled
step's is not recorded). A wrapped collective that calls another wrapped one counts once, as
the outer one; torch's object collectives (all_gather_object, ...) are not recorded.
On CUDA the device is synchronised before and after each collective while tracing (NCCL
returns once the work is queued, so host time alone would show neither transfer nor
waiting); that serialises what would overlap, so read the split, not the step time. An
asynchronous collective (async_op=True) counts only its launch and is marked so.
"""

from __future__ import annotations

import functools
import inspect
import statistics
import sys
import time
from collections import Counter
from typing import Any, Callable

import torch.distributed as dist

TRACED = ("all_reduce", "all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor",
          "reduce_scatter", "reduce_scatter_tensor", "broadcast", "reduce", "barrier")
# (module, attribute, name): collectives other libraries call through references taken at import.
BOUND_ELSEWHERE = (
    ("deepspeed.comm.comm", "cdb.all_gather_function", "all_gather_into_tensor"),
    ("deepspeed.comm.comm", "cdb.reduce_scatter_function", "reduce_scatter_tensor"),
    ("megatron.core.tensor_parallel.mappings", "dist_all_gather_func", "all_gather_into_tensor"),
    ("megatron.core.tensor_parallel.mappings", "dist_reduce_scatter_func", "reduce_scatter_tensor"),
    # Through shared memory between ranks of one host, else torch.distributed's (l3train.parallel.shared_memory).
    ("l3train.parallel.collectives", "all_to_all_single", "all_to_all_single"),
)
ASYNC = " (async: launch only)"

# One rank's step: the collectives in order, each (name, ms computing since the previous one
# returned or the step began, ms inside it, the ranks of its group), and the ms computing
# after the last one.
Step = dict[str, Any]


class CollectiveTrace:
    """Records this rank's collectives, step by step, between `start()` and `stop()`;
    `synchronize` (torch.cuda.synchronize on a GPU) runs around each one."""

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self.steps: list[Step] = []
        self.synchronize = synchronize
        self._originals: list[tuple[Any, str, Callable]] = []  # (holder, attribute, function)
        self._group_ranks: dict[int, tuple[int, ...]] = {}
        self._since = 0  # perf_counter_ns when the last collective returned (or the step began)
        self._depth = 0  # wrapped collectives in progress (a nested call counts once, as the outer one)

    def start(self) -> None:
        wrapped = [(dist, name, name) for name in TRACED]
        for module_name, path, name in BOUND_ELSEWHERE:
            *owners, attribute = path.split(".")
            holder = sys.modules.get(module_name)
            for owner in owners:
                holder = getattr(holder, owner, None)
            if callable(getattr(holder, attribute, None)):
                wrapped.append((holder, attribute, name))
        for holder, attribute, name in wrapped:
            original = getattr(holder, attribute)
            self._originals.append((holder, attribute, original))
            setattr(holder, attribute, self._timed(name, original))

    def step_begins(self) -> None:
        self._close_step()
        self.steps.append({"collectives": [], "after_ms": 0.0})

    def stop(self) -> None:
        """End the trace (the current step ends now) and restore the wrapped functions."""
        self._close_step()
        for holder, attribute, original in self._originals:
            setattr(holder, attribute, original)
        self._originals.clear()

    def _close_step(self) -> None:
        if self.synchronize is not None:
            self.synchronize()
        now = time.perf_counter_ns()
        if self.steps:
            self.steps[-1]["after_ms"] = (now - self._since) / 1e6
        self._since = now

    def _ranks(self, group: Any) -> tuple[int, ...]:
        group = dist.group.WORLD if group is None else group
        if id(group) not in self._group_ranks:
            self._group_ranks[id(group)] = tuple(dist.get_process_group_ranks(group))
        return self._group_ranks[id(group)]

    def _timed(self, name: str, original: Callable) -> Callable:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth or not self.steps:
                return original(*args, **kwargs)
            try:
                bound = signature.bind(*args, **kwargs).arguments
            except TypeError:  # torch's own error, untimed
                return original(*args, **kwargs)
            launch_only = bool(bound.get("async_op"))
            if self.synchronize is not None:
                self.synchronize()
            begin = time.perf_counter_ns()
            self._depth += 1
            try:
                result = original(*args, **kwargs)
                if self.synchronize is not None and not launch_only:  # an async call's completion is its wait()'s
                    self.synchronize()
                return result
            finally:
                self._depth -= 1
                end = time.perf_counter_ns()
                label = name + (ASYNC if launch_only else "")
                self.steps[-1]["collectives"].append((label, (begin - self._since) / 1e6, (end - begin) / 1e6,
                                                      self._ranks(bound.get("group"))))
                self._since = end

        return timed


def wait_report(per_rank: list[list[Step]]) -> list[str]:
    """Markdown lines: per collective of a step, the computing before it, the time in it (mean
    over ranks), its transfer (on each rank, the least time any rank of its group spent in it)
    and the waiting for a later rank (mean and largest over the ranks), averaged over the steps
    whose collectives are the most common sequence (a logging step adds one); then the step's
    totals. `per_rank[r][s]` is rank r's step s (`CollectiveTrace.steps`)."""
    ranks = len(per_rank)

    def names(step: Step) -> tuple[str, ...]:
        return tuple(call[0] for call in step["collectives"])

    sequences = [names(step) for step in per_rank[0]]
    aligned = [s for s, sequence in enumerate(sequences) if all(names(steps[s]) == sequence for steps in per_rank)]
    if not aligned:
        return ["no step ran the same collectives on every rank"]
    common = Counter(sequences[s] for s in aligned).most_common(1)[0][0]
    chosen = [s for s in aligned if sequences[s] == common]
    lines = [f"{ranks} rank(s), {len(chosen)} of {len(sequences)} profiled steps with the same {len(common)} "
             f"collectives (ms per step):", "",
             "| # | collective | computing before (mean over ranks) | in it (mean) | transfer (least in its group) | "
             "waiting for a later rank: mean | most |", "|---|---|---|---|---|---|---|"]
    totals = {"compute": 0.0, "inside": 0.0, "transfer": 0.0, "most": 0.0}
    for index, name in enumerate(common):
        calls = [[per_rank[r][s]["collectives"][index] for s in chosen] for r in range(ranks)]  # [rank][step]
        compute = statistics.mean(call[1] for rank_calls in calls for call in rank_calls)
        inside = [statistics.mean(call[2] for call in rank_calls) for rank_calls in calls]
        transfer = [statistics.mean(min(calls[q][k][2] for q in call[3]) for k, call in enumerate(rank_calls))
                    for rank_calls in calls]
        waiting = [spent - least for spent, least in zip(inside, transfer)]
        row = {"compute": compute, "inside": statistics.mean(inside), "transfer": statistics.mean(transfer),
               "most": max(waiting)}
        lines.append(f"| {index} | {name} | {compute:.2f} | {row['inside']:.2f} | {row['transfer']:.2f} | "
                     f"{statistics.mean(waiting):.2f} | {row['most']:.2f} |")
        for key, value in row.items():
            totals[key] += value
    after = statistics.mean(per_rank[r][s]["after_ms"] for r in range(ranks) for s in chosen)
    lines += ["", f"Per step, mean over ranks: {totals['compute'] + after:.1f} ms computing ({after:.1f} of it after "
                  f"the last collective), {totals['inside']:.1f} ms in {len(common)} collectives: "
                  f"{totals['transfer']:.1f} ms transfer, {totals['inside'] - totals['transfer']:.1f} ms waiting "
                  f"for a later rank (the most waiting rank at each: {totals['most']:.1f} ms)."]
    return lines
