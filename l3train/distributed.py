"""Process-group set-up: NCCL on CUDA, gloo on CPU, one entry for torchrun, SLURM and plain python.

A plain `python -m l3train.train` (no launcher) runs as a world of one. DeepSpeed picks
its accelerator at import time, so `select_accelerator()` must run before deepspeed is
imported: on machines without CUDA it selects DeepSpeed's CPU accelerator.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from l3train.errors import L3TrainError


def select_accelerator() -> torch.device:
    """The device this process trains on; tells DeepSpeed to use the CPU when there is no GPU."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _rank_environment_without_torchrun() -> None:
    """Fill torch.distributed's variables for a process not started by torchrun.

    Started by `srun` with several tasks, each task is one rank (SLURM_PROCID/NTASKS/
    LOCALID) and MASTER_ADDR/MASTER_PORT must name rank 0's node; otherwise this is a
    world of one.
    """
    tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if tasks > 1 and "SLURM_PROCID" in os.environ:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise L3TrainError("launched by srun with several tasks but MASTER_ADDR/MASTER_PORT are not set; "
                               "export them (rank 0's node address and a free port) or use launch/slurm/pretrain.sbatch")
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=str(tasks),
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    else:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))


def launcher_rank() -> int:
    """This process's rank as its launcher announced it (torchrun's RANK, srun's
    SLURM_PROCID; 0 without a launcher), known before torch.distributed starts."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def expected_world_size() -> int:
    """The number of ranks this process will join, known before torch.distributed starts:
    torchrun's WORLD_SIZE, srun's task count, else 1."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ:
        return int(os.environ.get("SLURM_NTASKS", "1"))
    return 1


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


def lost_ranks(wait_seconds: float = 5.0) -> list[int] | None:
    """After a failed collective: the ranks that did not check in as alive within
    `wait_seconds` (None if the store is gone too). Every survivor notices a dead peer within
    moments through its closed connections and checks in here, through the process group's
    key-value store (torchrun's agent hosts it, so it outlives any rank)."""
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        store.set(f"l3train/alive/{rank}", "1")
        deadline = time.time() + wait_seconds
        while True:
            missing = [r for r in range(world) if not store.check([f"l3train/alive/{r}"])]
            if not missing or time.time() > deadline:
                return missing
            time.sleep(0.1)
    except (RuntimeError, ValueError):  # the store's host died with the rank
        return None


# The exit status of a rank that lost contact with another one (neither a user error, 2,
# nor a requeue after a stop signal, 75).
EXIT_RANK_LOST = 3


def is_collective_failure(err: BaseException) -> bool:
    """A collective failed because a peer went away: NCCL raises DistError (c10d's type);
    gloo raises a plain RuntimeError from its TCP transport."""
    return isinstance(err, torch.distributed.DistError) or "gloo/transport" in str(err)


def init_distributed(timeout_minutes: float = 10.0) -> World:
    """Initialise torch.distributed through DeepSpeed (which also sets up its own comm); a
    collective waiting longer than `timeout_minutes` fails instead of hanging."""
    if "RANK" not in os.environ:
        _rank_environment_without_torchrun()
    device = select_accelerator()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    return World(rank=torch.distributed.get_rank(), size=torch.distributed.get_world_size(),
                 local_rank=int(os.environ["LOCAL_RANK"]), device=device)
