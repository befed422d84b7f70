"""Graceful stop on SIGTERM/SIGUSR1: finish the step, save a checkpoint, exit for requeue.

SLURM sends SIGTERM at preemption and, with `--signal=USR1@<seconds>`, SIGUSR1 before the
time limit. The handler only sets a flag; the training loop checks it after each
optimizer step, agreeing across ranks with one tiny all-reduce so that every rank saves
and stops at the same step. The trainer then exits with `EXIT_REQUEUE` (75,
EX_TEMPFAIL), which launch/slurm/pretrain.sbatch turns into `scontrol requeue`.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank has received a stop signal."""
        flag = torch.tensor(float(self.signal_name is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
