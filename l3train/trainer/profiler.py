"""Profile a range of training steps: where a step's time goes, per phase, per rank.

    training.profile_steps=[10,15]   →   run_dir/profile/trace_rank00000.json (Chrome trace)
                                         run_dir/profile/phases_rank00000.json
                                         run_dir/profile/collectives.md (all ranks)

The trainer labels its phases with `torch.profiler.record_function`: `data` (fetching the
batch), `forward`, `backward`, `optimizer` (clipping, DeepSpeed's step and the rank-local
optimizers), and the collectives label `all_to_all` (the sharded L³ rows' and experts'
exchanges, forward and backward; it is part of forward and backward, shown apart). Outside
the profiled range the labels cost a check of a flag. On CUDA the device time per phase is
recorded too (kernels run asynchronously, so host ranges alone would mislead).

With several ranks, every collective of the range is timed on every rank too
(l3train.trainer.collective_trace): rank 0 gathers them and writes how much of a step is
computing, transfer, and waiting for a later rank, collective by collective.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from l3train.trainer.collective_trace import CollectiveTrace, wait_report
from l3train.utils.atomic import atomic_write_text

PHASES = ("data", "forward", "backward", "optimizer", "all_to_all")


class StepProfiler:
    """Runs torch.profiler over steps [first, last) (0-based step indices) and writes a Chrome
    trace and the milliseconds per step of each phase for this rank."""

    def __init__(self, steps: list[int], run_dir: str, rank: int, device: torch.device,
                 log: Callable[[str], None]) -> None:
        self.first, self.last = steps if steps else (-1, -1)
        self.directory, self.rank, self.device, self.log = Path(run_dir) / "profile", rank, device, log
        self.profiler: torch.profiler.profile | None = None
        self.collectives: CollectiveTrace | None = None

    def step_begins(self, step: int) -> None:
        """Before step index `step` (the number of steps completed so far)."""
        if step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            if dist.is_initialized() and dist.get_world_size() > 1:
                self.collectives = CollectiveTrace(torch.cuda.synchronize if self.device.type == "cuda" else None)
                self.collectives.start()
        if self.collectives is not None:
            self.collectives.step_begins()

    def step_ends(self, completed: int) -> None:
        """After a step; `completed` steps are done. Writes the results at the end of the range."""
        if self.profiler is None or completed < self.last:
            return
        if self.collectives is not None:
            self.collectives.stop()  # before the profiler's own shutdown, which is not the step's
        self.profiler.__exit__(None, None, None)
        waits = self._collective_waits()
        steps = completed - self.first
        self.directory.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(self.directory / f"trace_rank{self.rank:05d}.json"))
        phases = phase_times(self.profiler, steps)
        (self.directory / f"phases_rank{self.rank:05d}.json").write_text(json.dumps(
            {"steps": [self.first, completed], "ms_per_step": phases}, indent=1))
        if self.rank == 0:
            self.log(f"profile of steps {self.first}-{completed - 1} (rank 0, ms per step): "
                     + ", ".join(f"{name} {ms['host']:.1f}" for name, ms in phases.items())
                     + f"; trace in {self.directory}")
            if waits:
                atomic_write_text(self.directory / "collectives.md", "\n".join(waits) + "\n")
                self.log(f"collectives of steps {self.first}-{completed - 1}: {waits[-1]} "
                         f"({self.directory / 'collectives.md'})")
        self.profiler = None

    def _collective_waits(self) -> list[str]:
        """Every rank's collective timings gathered on rank 0 (all ranks call this at the same
        step), as `wait_report`'s lines there; [] elsewhere or with one rank."""
        if self.collectives is None:
            return []
        gathered = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(self.collectives.steps, gathered, dst=0)
        self.collectives = None
        return wait_report(gathered) if self.rank == 0 else []


    def close(self) -> None:
        """After training: a range that did not end (the run stopped before its last step) is
        dropped, with one line, and the collectives are unwrapped."""
        if self.profiler is None:
            return
        if self.collectives is not None:
            self.collectives.stop()
            self.collectives = None
        self.profiler.__exit__(None, None, None)
        self.profiler = None
        if self.rank == 0:
            self.log(f"profile of steps {self.first}-{self.last - 1} not written: the run stopped before step "
                     f"{self.last} (training.profile_steps)")


def phase_times(profiler: torch.profiler.profile, steps: int) -> dict[str, dict[str, float]]:
    """Per labelled phase: host milliseconds per step (the range's wall time) and, on CUDA, the
    device milliseconds of the kernels launched inside it."""
    totals = {name: {"host": 0.0, "device": 0.0} for name in PHASES}
    for event in profiler.key_averages():
        if event.key in totals:
            totals[event.key]["host"] += event.cpu_time_total / 1000 / steps
            totals[event.key]["device"] += getattr(event, "device_time_total", 0.0) / 1000 / steps
    return totals
