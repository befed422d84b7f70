"""Ending a process: the one place that knows how (imports nothing of l3train)."""

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
