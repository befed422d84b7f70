"""Process-group set-up: NCCL on CUDA, gloo on CPU, one entry for torchrun, SLURM and plain python.

A plain `python -m l3train.train` (no launcher) runs as a world of one. The device is
decided once, by `select_accelerator()`: CUDA when torch sees a GPU, else the CPU.
DeepSpeed picks its accelerator the first time it is asked for it (from `DS_ACCELERATOR`,
else by probing), so `select_accelerator()` runs before DeepSpeed is used and sets
`DS_ACCELERATOR` to the same device, whatever the environment said: a `DS_ACCELERATOR=cpu`
left by a launcher or a test harness on a GPU machine would otherwise put the engine on
the CPU while the batches go to `cuda:N`.

`node_layout()` is the launcher's side of the same decision (launch/slurm/pretrain.sbatch):
how many trainers a node starts and how many threads each gets.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from l3train.errors import L3TrainError


def select_accelerator() -> torch.device:
    """The device this process trains on: CUDA device LOCAL_RANK when torch sees GPUs, else
    the CPU; DeepSpeed's accelerator is set to match (see the module docstring)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if gpus and local_rank >= gpus:  # else torch.cuda.set_device fails with "invalid device ordinal"
        raise L3TrainError(f"LOCAL_RANK={local_rank}, but this node has {gpus} visible GPU(s) "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most "
                           f"{gpus} trainer(s) per node, one per GPU")
    _match_deepspeed_accelerator("cuda" if gpus else "cpu", gpus, local_rank)
    if not gpus:
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def accelerator_name() -> str:
    """The device type DeepSpeed's accelerator runs on ("cuda", "cpu"); chosen at the first call
    in a process (from DS_ACCELERATOR), fixed after (DeepSpeed's public API)."""
    import deepspeed

    return deepspeed.get_accelerator().device_name()


def _match_deepspeed_accelerator(device_type: str, gpus: int, local_rank: int) -> None:
    """Point DeepSpeed at `device_type`. A `DS_ACCELERATOR` that says otherwise is overridden,
    with one line per node (local rank 0); a DeepSpeed that has already chosen another
    accelerator (imported and used before l3train decided) cannot be switched: refused."""
    configured = os.environ.get("DS_ACCELERATOR")
    if configured is not None and configured != device_type and local_rank == 0:
        seen = f"{gpus} GPU(s) are visible" if gpus else "no GPU is visible"
        print(f"[l3train] DS_ACCELERATOR={configured} in the environment, but {seen}: DeepSpeed uses "
              f"{device_type}", file=sys.stderr, flush=True)
    os.environ["DS_ACCELERATOR"] = device_type
    if "deepspeed" in sys.modules:
        chosen = accelerator_name()  # chosen now from DS_ACCELERATOR unless chosen before
        if chosen != device_type:
            raise L3TrainError(f"DeepSpeed already runs on {chosen}, but this process trains on {device_type}: "
                               f"call l3train.distributed.init_distributed() before using DeepSpeed, or set "
                               f"DS_ACCELERATOR={device_type}")


@dataclass(frozen=True)
class NodeLayout:
    """What a node of a SLURM job starts (`node_layout`)."""

    trainers: int  # trainer processes on the node
    threads: int  # OMP_NUM_THREADS of each
    source: str  # where `trainers` came from, for the job's log


def _gpu_count(value: str, variable: str) -> int:
    """A per-node GPU count as SLURM writes it: "4" (SLURM_GPUS_ON_NODE), or --gpus-per-node's
    "4", "h100:4" or "a100:2,v100:2" (SLURM_GPUS_PER_NODE)."""
    try:
        return sum(int(item.rsplit(":", 1)[-1]) for item in value.split(","))
    except ValueError:
        raise L3TrainError(f"{variable}={value!r} is not a GPU count (expected e.g. 4 or h100:4)") from None


def node_layout(environ: Mapping[str, str], visible_gpus: int) -> NodeLayout:
    """Trainers per node and threads per trainer for launch/slurm/pretrain.sbatch, from the
    job's environment and the GPUs torch sees on the node (`visible_gpus`).

    Trainers: L3TRAIN_GPUS_PER_NODE when set; else the GPUs SLURM allocated on the node
    (SLURM_GPUS_ON_NODE, set for --gres=gpu:N and --gpus-per-node; else --gpus-per-node's
    SLURM_GPUS_PER_NODE); else every visible GPU (a site that hands out whole nodes without
    GPU accounting); else 1 (a CPU node). Each trainer needs a GPU of its own, so more
    trainers than visible GPUs are refused, as are GPUs SLURM allocated that torch cannot see
    (a CPU build of torch, or a CUDA_VISIBLE_DEVICES that hides them): that job would
    silently train on the CPU. Threads: OMP_NUM_THREADS when set, else the job's CPUs on the
    node (SLURM_CPUS_ON_NODE) shared among the trainers, at least 1.
    """
    if environ.get("L3TRAIN_GPUS_PER_NODE"):
        value = environ["L3TRAIN_GPUS_PER_NODE"]
        if not value.isdigit() or int(value) < 1:
            raise L3TrainError(f"L3TRAIN_GPUS_PER_NODE={value!r} must be a positive number of trainers per node")
        trainers, source = int(value), "L3TRAIN_GPUS_PER_NODE"
    elif environ.get("SLURM_GPUS_ON_NODE"):
        trainers, source = _gpu_count(environ["SLURM_GPUS_ON_NODE"], "SLURM_GPUS_ON_NODE"), "SLURM_GPUS_ON_NODE"
    elif environ.get("SLURM_GPUS_PER_NODE"):
        trainers, source = _gpu_count(environ["SLURM_GPUS_PER_NODE"], "SLURM_GPUS_PER_NODE"), "SLURM_GPUS_PER_NODE"
    elif visible_gpus:
        trainers, source = visible_gpus, "the visible GPUs"
    else:
        trainers, source = 1, "no GPU: one CPU trainer"
    if trainers < 1:
        raise L3TrainError(f"{source} gives {trainers} GPUs per node; request GPUs with --gpus-per-node=N "
                           f"or set L3TRAIN_GPUS_PER_NODE")
    if visible_gpus and trainers > visible_gpus:
        raise L3TrainError(f"{trainers} trainers per node ({source}), but torch sees {visible_gpus} GPU(s) on "
                           f"this node; start at most one trainer per GPU")
    if not visible_gpus and source.startswith("SLURM_"):
        raise L3TrainError(f"SLURM allocated {trainers} GPU(s) per node ({source}={environ[source]}), but torch "
                           f"sees none (torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                           f"{environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); install a CUDA build of torch")
    if environ.get("OMP_NUM_THREADS"):
        threads = environ["OMP_NUM_THREADS"]
        if not threads.isdigit() or int(threads) < 1:
            raise L3TrainError(f"OMP_NUM_THREADS={threads!r} must be a positive number of threads")
        return NodeLayout(trainers, int(threads), source)
    cpus = int(environ.get("SLURM_CPUS_ON_NODE") or trainers)
    return NodeLayout(trainers, max(1, cpus // trainers), source)


def _ephemeral_ports() -> range:
    """The ports the kernel hands out to connections and `bind(0)` (Linux: ip_local_port_range)."""
    try:
        low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A TCP port free on this host now, for a local rendezvous that binds it a moment later.

    Drawn at random below the ephemeral range where there is room: a port the kernel chose
    (`bind(0)`) is free now but is also where every connection's local port comes from,
    and ranks of concurrent jobs (tests on several workers) open many; once, one took the
    port before the launcher bound it (EADDRINUSE)."""
    ephemeral = _ephemeral_ports()
    candidates = range(20000, ephemeral.start) if ephemeral.start > 21000 else range(0)
    # OS entropy, not the random module: processes that seeded it alike would draw alike.
    for port in random.SystemRandom().sample(candidates, min(50, len(candidates))):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no room below the ephemeral range: the kernel's choice
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
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))


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


def is_collective_timeout(err: BaseException) -> bool:
    """A collective failed because it waited past the timeout (gloo: "Timed out waiting ...";
    NCCL's watchdog: "... timeout")."""
    return is_collective_failure(err) and ("timed out" in str(err).lower() or "Watchdog caught" in str(err))


def is_collective_failure(err: BaseException) -> bool:
    """A collective failed because a peer went away: NCCL raises DistError (c10d's type);
    gloo raises a plain RuntimeError from its TCP transport."""
    return isinstance(err, torch.distributed.DistError) or "gloo/transport" in str(err)


def init_distributed(timeout_minutes: float = 10.0) -> World:
    """Initialise torch.distributed through DeepSpeed (which also sets up its own comm); a
    collective waiting longer than `timeout_minutes`, in any group of the run, fails instead
    of hanging."""
    if "RANK" not in os.environ:
        _rank_environment_without_torchrun()
    device = select_accelerator()
    import deepspeed

    timeout = datetime.timedelta(minutes=timeout_minutes)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False, verbose=False, timeout=timeout)
    # Groups created later without a timeout of their own (DeepSpeed's ZeRO and sequence
    # groups, l3train's) get torch's default instead (30 minutes), not the world's: a rank
    # that hangs (stopped, deadlocked, a stuck GPU) would keep the others waiting for that
    # long. new_group reads these module defaults when it is called; megatron-core, which
    # passes its own, is given the same (l3train.parallel.state).
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    return World(rank=torch.distributed.get_rank(), size=torch.distributed.get_world_size(),
                 local_rank=int(os.environ["LOCAL_RANK"]), device=device)
