"""Process-group set-up: NCCL on CUDA, gloo on CPU, one entry for torchrun, SLURM and plain python.

A plain `python -m l3train.train` (no launcher) runs as a world of one. DeepSpeed picks
its accelerator at import time, so `select_accelerator()` must run before deepspeed is
imported: on machines without CUDA it selects DeepSpeed's CPU accelerator.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


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


def init_distributed() -> World:
    """Initialise torch.distributed through DeepSpeed (which also sets up its own comm)."""
    device = select_accelerator()
    if "RANK" not in os.environ:  # not launched by torchrun/srun: a single process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False, verbose=False)
    return World(rank=torch.distributed.get_rank(), size=torch.distributed.get_world_size(),
                 local_rank=int(os.environ["LOCAL_RANK"]), device=device)
