"""Ending a process, and telling whether one still runs (imports nothing of l3train)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import NoReturn


def exit_process(status: int) -> NoReturn:
    """End a process that has used torch.distributed, without interpreter finalization.

    Why: a gloo worker thread that finishes a collective releases its tensors' Python
    wrappers, which takes the GIL. If the main thread begins finalizing between torch's
    `Py_IsInitialized()` check and that GIL acquisition, CPython ends the worker thread with
    `pthread_exit`; the forced unwind crosses noexcept destructors and the process aborts
    ("terminate called without an active exception", SIGABRT) after its work is done.
    `destroy_process_group()` cannot prevent it: it does not join gloo's threads while
    megatron-core and DeepSpeed still hold their groups. Callers first pass a barrier (all
    ranks are past their last collective), then exit here; nothing l3train needs runs in
    atexit handlers or finalizers (logs and writers are closed explicitly).
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    record_dir = os.environ.get("L3TRAIN_EXIT_DIR")  # launch/slurm/pretrain.sbatch collects every rank's status
    if record_dir:
        Path(record_dir, f"rank_{os.environ.get('RANK', '0')}").write_text(f"{status}\n")
    os._exit(status)


def process_is_running(pid: int) -> bool:
    """Whether process `pid` of this host exists and has not ended. A zombie (dead, not yet
    collected by its parent, as a killed rank is until its launcher reaps it) has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc, or another user's process hidden in it (hidepid): does the pid exist?
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, owned by another user
        return True
    return stat[stat.rfind(")") + 2:][:1] not in ("Z", "X")  # the state follows the command name
