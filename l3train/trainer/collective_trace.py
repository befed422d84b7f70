"""Where the profiled steps wait: every collective's time on every rank, split into transfer
and waiting for a later rank (`training.profile_steps` → run_dir/profile/collectives.md).

A collective returns on a rank once every rank of its group has reached it, so its time on
a rank is the transfer plus the wait for the latest rank. The rank that spends the least time
in it arrived last: its time is the transfer, and what any rank spends beyond that is time
spent waiting for a later one. The split needs no clock shared by the ranks (nodes need not
agree on the time).

Why it matters: the same work takes a little longer or shorter on each rank (other
processes, interrupts, caches), and each collective makes every rank wait for the slowest
since the previous one. The more collectives split a step's compute, the more of that spread
is paid: the sharded L³ rows exchange positions four times per layer and step
(l3train.parallel.sharded_l3), a dense model's data parallelism once per step.

How: while tracing, the torch.distributed collectives are wrapped where callers look them
up (`dist.all_reduce(...)`, as l3train, DeepSpeed and megatron-core call them), and so are
the two that DeepSpeed's communication backend keeps references to from its start-up (its
ZeRO all-gather and reduce-scatter). A step's collectives are those from its start to the
next step's (its logging comes after it; the last profiled step's is not recorded). A
wrapped collective that calls another wrapped one counts once, as the outer one; an
asynchronous one (async_op=True) counts only its launch; torch's object collectives
(all_gather_object, ...) are not recorded.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections import Counter
from typing import Any, Callable

import torch.distributed as dist

TRACED = ("all_reduce", "all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor",
          "reduce_scatter", "reduce_scatter_tensor", "broadcast", "reduce", "barrier")
# DeepSpeed's backend (deepspeed.comm.comm.cdb) calls these through attributes set at its start-up.
DEEPSPEED_TRACED = {"all_gather_function": "all_gather_into_tensor", "reduce_scatter_function": "reduce_scatter_tensor"}

# One rank's step: the collectives in order, each (name, ms computing since the previous one
# returned or the step began, ms inside it), and the ms computing after the last one.
Step = dict[str, Any]


class CollectiveTrace:
    """Records this rank's collectives, step by step, between `start()` and `stop()`."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self._originals: list[tuple[Any, str, Callable]] = []  # (holder, attribute, function)
        self._since = 0  # perf_counter_ns when the last collective returned (or the step began)
        self._depth = 0  # wrapped collectives in progress (a nested call counts once, as the outer one)

    def start(self) -> None:
        wrapped = [(dist, name, name) for name in TRACED]
        backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
        wrapped += [(backend, attribute, name) for attribute, name in DEEPSPEED_TRACED.items()
                    if callable(getattr(backend, attribute, None))]
        for holder, attribute, name in wrapped:
            original = getattr(holder, attribute)
            self._originals.append((holder, attribute, original))
            setattr(holder, attribute, self._timed(name, original))

    def step_begins(self) -> None:
        self._close_step()
        self.steps.append({"collectives": [], "after_ms": 0.0})

    def stop(self) -> None:
        self._close_step()
        for holder, attribute, original in self._originals:
            setattr(holder, attribute, original)
        self._originals.clear()

    def _close_step(self) -> None:
        now = time.perf_counter_ns()
        if self.steps:
            self.steps[-1]["after_ms"] = (now - self._since) / 1e6
        self._since = now

    def _timed(self, name: str, original: Callable) -> Callable:
        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth or not self.steps:
                return original(*args, **kwargs)
            begin = time.perf_counter_ns()
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
                end = time.perf_counter_ns()
                self.steps[-1]["collectives"].append((name, (begin - self._since) / 1e6, (end - begin) / 1e6))
                self._since = end

        return timed


def wait_report(per_rank: list[list[Step]]) -> list[str]:
    """Markdown lines: per collective of a step, the computing before it, the time in it (mean
    over ranks), its transfer (the least time any rank spent in it) and the waiting for a later
    rank (mean and largest over the ranks), averaged over the steps whose collectives are the
    most common sequence (a logging step adds one); then the step's totals. `per_rank[r][s]`
    is rank r's step s (`CollectiveTrace.steps`)."""
    ranks = len(per_rank)
    sequences = [tuple(name for name, _, _ in per_rank[0][s]["collectives"]) for s in range(len(per_rank[0]))]
    aligned = [s for s, sequence in enumerate(sequences)
               if all(tuple(name for name, _, _ in steps[s]["collectives"]) == sequence for steps in per_rank)]
    if not aligned:
        return ["no step ran the same collectives on every rank"]
    common = Counter(sequences[s] for s in aligned).most_common(1)[0][0]
    chosen = [s for s in aligned if sequences[s] == common]
    lines = [f"{ranks} rank(s), {len(chosen)} of {len(sequences)} profiled steps with the same {len(common)} "
             f"collectives (ms per step):", "",
             "| # | collective | computing before (mean over ranks) | in it (mean) | transfer (least) | "
             "waiting for a later rank: mean | most |", "|---|---|---|---|---|---|---|"]
    totals = {"compute": 0.0, "inside": 0.0, "transfer": 0.0, "most": 0.0}
    for index, name in enumerate(common):
        compute = statistics.mean(per_rank[r][s]["collectives"][index][1] for r in range(ranks) for s in chosen)
        inside = [statistics.mean(per_rank[r][s]["collectives"][index][2] for s in chosen) for r in range(ranks)]
        transfer = statistics.mean(min(per_rank[r][s]["collectives"][index][2] for r in range(ranks))
                                   for s in chosen)
        mean = statistics.mean(inside)
        lines.append(f"| {index} | {name} | {compute:.2f} | {mean:.2f} | {transfer:.2f} | {mean - transfer:.2f} | "
                     f"{max(inside) - transfer:.2f} |")
        for key, value in (("compute", compute), ("inside", mean), ("transfer", transfer),
                           ("most", max(inside) - transfer)):
            totals[key] += value
    after = statistics.mean(per_rank[r][s]["after_ms"] for r in range(ranks) for s in chosen)
    lines += ["", f"Per step, mean over ranks: {totals['compute'] + after:.1f} ms computing ({after:.1f} of it after "
                  f"the last collective), {totals['inside']:.1f} ms in {len(common)} collectives: "
                  f"{totals['transfer']:.1f} ms transfer, {totals['inside'] - totals['transfer']:.1f} ms waiting "
                  f"for a later rank (the most waiting rank at each: {totals['most']:.1f} ms)."]
    return lines
