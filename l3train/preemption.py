"""Graceful stop on SIGTERM/SIGUSR1: finish the step, save a checkpoint, exit for requeue.

SLURM sends SIGTERM at preemption and, with `--signal=USR1@<seconds>`, SIGUSR1 before the
time limit. The handler only sets a flag; each optimizer step reads it at its accumulation
boundary, where the ranks agree on it in the step's one all-reduce of flags (beside the
skip check), so that every rank finishes that step, saves and stops after it. A signal that
arrives after a step's boundary (during its optimizer step, logging, validation or a save)
is agreed at the next step's: allow a step and a validation more in `--signal=USR1@<seconds>`
and in SLURM's KillWait. The trainer then exits with `EXIT_REQUEUE` (75, EX_TEMPFAIL), which
launch/slurm/pretrain.sbatch turns into `scontrol requeue`.
"""

from __future__ import annotations

import signal

EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        """Whether this process has received a stop signal (the ranks agree on it in the
        trainer's step agreement, `Trainer._clip_and_agree`)."""
        return self.signal_name is not None
