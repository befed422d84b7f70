"""All-to-all through shared memory between the ranks of one host (CPU tensors, gloo groups).

Why: gloo moves CPU tensors over loopback TCP even between processes of one machine. At
2 ranks on the 2-core development machine each of the sharded L³ rows' all-to-alls took
0.13-0.23 ms with the ranks aligned, 9-10 ms of a 172 ms step for the 10 of a step with
waiting included, and gloo's transport threads and the kernel's socket copies took CPU time
from the ranks computing beside them: the same training step took 154 ms with this exchange
(docs/benchmarks.md). Here every rank writes what it sends once into its own shared
segment, and every rank copies what it receives straight from the senders' segments.

Protocol, per group (`enable_shared_memory`, collective, once): every rank maps every
rank's segment (a file in /dev/shm, unlinked by its rank once all ranks have mapped it, or
when setting up fails; only a rank killed in between leaves its file behind): a header,
then two buffers used alternately by the group's exchanges. Exchange n:

1. each rank copies its input into its buffer n mod 2 and writes, beside it in the header,
   its byte count and where each destination's rows start; then publishes n in its header's
   sequence word (release order: whoever reads n sees the data; l3train/parallel/_shm_signal.c);
2. it waits until every rank has published n, then copies its rows out of each sender's
   buffer n mod 2.

Two buffers suffice with no acknowledgement: a rank writes buffer n mod 2 again at exchange
n + 2 only after it has seen every rank publish n + 1, which each did after it finished
reading exchange n. An exchange that does not fit a buffer goes through gloo instead on
every rank (each sees every rank's byte count, so all decide alike), and the segments are
then rebuilt at twice the size.

A waiting rank spins for microseconds, then sleeps on the word (futex). Every 50 ms it
checks that the ranks it waits for are still alive (a dead process fails the exchange at
once, as a lost connection fails gloo's) and ends with a timeout error after the
collective timeout (`parallel.collective_timeout_minutes`), as gloo does; both raise
`torch.distributed.DistError`, which the trainer reports in one line.

Used only where it can be: a gloo group whose ranks share one host, boot, process
namespace and /dev/shm (each rank reads back a random number every other rank wrote into
its segment), on Linux, with a C compiler and room in /dev/shm; otherwise the group's
all-to-alls stay with gloo (`l3train.parallel.collectives.all_to_all_single` chooses).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from l3train.errors import L3TrainError
from l3train.process import process_is_running
from l3train.utils.c_library import load_c_library

_SOURCE = Path(__file__).with_name("_shm_signal.c")
SHM_DIR = Path("/dev/shm")
HEADER_BYTES = 4096  # the sequence word (bytes 0-3), the segment's random number (8-15), int64 fields from 64
NONCE_OFFSET = 8
FIELDS_OFFSET = 64
MAX_RANKS = (HEADER_BYTES - FIELDS_OFFSET) // 8 // 2 - 2  # two parities of (bytes, P + 1 offsets)
MIN_CAPACITY = 1 << 20  # bytes per buffer at first
WAIT_SLICE_NS = 50_000_000  # how often a waiting rank checks the others' liveness and the timeout


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    library = load_c_library(_SOURCE, ("-O2", "-shared", "-fPIC", "-std=c99"), "the shared-memory all-to-all")
    library.shm_publish.restype = None
    library.shm_publish.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    library.shm_wait.restype = ctypes.c_int
    library.shm_wait.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int64]
    return library


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _usable_here() -> bool:
    if not sys.platform.startswith("linux") or not os.access(SHM_DIR, os.W_OK):
        return False
    try:
        _library()
    except (L3TrainError, OSError):
        return False
    return True


class SharedMemoryExchange:
    """The all-to-alls of one process group whose ranks share this host (see the module
    docstring); made by `enable_shared_memory`."""

    def __init__(self, group: dist.ProcessGroup, pids: list[int], timeout_seconds: float) -> None:
        self.group, self.pids, self.timeout_seconds = group, pids, timeout_seconds
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.global_ranks = dist.get_process_group_ranks(group)
        self.count = 0  # exchanges so far: exchange n publishes n
        self.capacity = 0
        self.segments: list[Tensor] = []  # every rank's segment, mapped (uint8)
        self.fields: list[np.ndarray] = []  # every rank's header fields (int64)

    def build(self, capacity: int) -> bool:
        """(Re)make every rank's segment with buffers of `capacity` bytes (collective). False,
        with every rank agreeing, where some rank could not make its own or map another's (a
        full /dev/shm; ranks whose /dev/shm differ, seen by a random number each writes into
        its segment and the others must read back). Every rank unlinks its file before it
        returns or raises: once mapped, the segments need no name."""
        self.segments, self.fields = [], []
        capacity = -(-capacity // 4096) * 4096
        total = HEADER_BYTES + 2 * capacity
        path = SHM_DIR / f"l3train-{os.getpid()}-{id(self):x}-{capacity}"
        nonce = int.from_bytes(os.urandom(7), "little")
        try:
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                try:
                    os.posix_fallocate(descriptor, 0, total)  # no SIGBUS later: the room is taken now
                finally:
                    os.close(descriptor)
                mine = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)
                mine[NONCE_OFFSET:NONCE_OFFSET + 8].view(torch.int64)[0] = nonce
                # The next exchange publishes count + 1: a fresh word must not look published already.
                mine[:4].numpy().view(np.uint32)[0] = self.count & 0xFFFFFFFF
                made = ""
            except OSError as err:
                made = f"no room for a shared-memory segment ({path}: {err})"
            offers: list = [None] * self.size
            dist.all_gather_object(offers, (path.name, nonce, made), group=self.group)
            problem = next((error for _, _, error in offers if error), "")
            if not problem:
                problem = self._map([(other, other_nonce) for other, other_nonce, _ in offers], total)
            agreed = torch.tensor(0 if problem else 1)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.group)  # also: every rank has mapped
        finally:
            path.unlink(missing_ok=True)
        if not agreed.item():
            self.segments, self.fields = [], []
            warnings.warn(f"all-to-alls stay with gloo: {problem or 'another rank could not use shared memory'}",
                          stacklevel=2)
            return False
        self.capacity = capacity
        return True

    def _map(self, offers: list[tuple[str, int]], total: int) -> str:
        """Map every rank's segment (by its name, in this rank's /dev/shm); what went wrong, or
        "" (see `build`)."""
        for name, nonce in offers:
            other = str(SHM_DIR / name)
            try:
                os.close(os.open(other, os.O_RDWR))  # exists here (torch.from_file would create it)
                segment = torch.from_file(other, shared=True, size=total, dtype=torch.uint8)
            except (OSError, RuntimeError) as err:
                return f"cannot map another rank's segment ({err}); do the ranks share {SHM_DIR}?"
            if int(segment[NONCE_OFFSET:NONCE_OFFSET + 8].view(torch.int64)[0]) != nonce:
                return f"{other} is not the segment another rank wrote: the ranks do not share {SHM_DIR}"
            self.segments.append(segment)
            self.fields.append(segment[FIELDS_OFFSET:HEADER_BYTES].view(torch.int64).numpy())
        return ""

    def _buffer(self, rank: int, parity: int) -> Tensor:
        start = HEADER_BYTES + parity * self.capacity
        return self.segments[rank][start:start + self.capacity]

    def _wait(self, rank: int, n: int, deadline: float) -> None:
        library, word = _library(), self.segments[rank].data_ptr()
        while not library.shm_wait(word, n & 0xFFFFFFFF, WAIT_SLICE_NS):
            who = f"rank {self.global_ranks[rank]} (pid {self.pids[rank]})"
            if not process_is_running(self.pids[rank]):
                raise dist.DistError(f"shared-memory all-to-all: {who} exited before exchange {n}: lost")
            if time.monotonic() > deadline:
                raise dist.DistError(f"shared-memory all-to-all: timed out after {self.timeout_seconds:g} s "
                                     f"waiting for {who} at exchange {n}")

    def all_to_all(self, output: Tensor, input: Tensor, output_split_sizes: list[int] | None,
                   input_split_sizes: list[int] | None) -> bool:
        """`dist.all_to_all_single`'s contract (rows of dim 0, contiguous `output`). False when
        the exchange did not fit (it went through gloo) and shared memory could not grow: the
        group's later exchanges must go through gloo."""
        if not output.is_contiguous():  # as gloo requires; a reshape below would write into a copy
            raise ValueError("the all-to-all's output must be contiguous")
        size, me = self.size, self.rank
        send = input.contiguous().reshape(-1).view(torch.uint8)
        received = output.reshape(-1).view(torch.uint8)
        in_row = math.prod(input.shape[1:]) * input.element_size()  # bytes per row (also of an empty input)
        out_row = math.prod(output.shape[1:]) * output.element_size()
        in_splits = input_split_sizes or [input.shape[0] // size] * size
        out_splits = output_split_sizes or [output.shape[0] // size] * size
        if sum(in_splits) != input.shape[0] or sum(out_splits) != output.shape[0]:  # as gloo refuses them
            raise ValueError(f"all-to-all split sizes {in_splits} -> {out_splits} do not cover the input's "
                             f"{input.shape[0]} and the output's {output.shape[0]} rows")
        deadline = time.monotonic() + self.timeout_seconds
        self.count += 1
        n, parity = self.count, self.count & 1
        base = parity * (size + 2)  # this exchange's fields: bytes, then size + 1 offsets
        mine = self.fields[me]
        mine[base] = send.numel()
        if send.numel() <= self.capacity:
            self._buffer(me, parity)[:send.numel()].copy_(send)
            mine[base + 1:base + size + 2] = np.cumsum([0, *in_splits]) * in_row
        _library().shm_publish(self.segments[me].data_ptr(), n & 0xFFFFFFFF)
        for step in range(1, size):
            self._wait((me + step) % size, n, deadline)
        largest = max(int(fields[base]) for fields in self.fields)
        if largest > self.capacity:  # every rank sees the same byte counts: all take this branch
            dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=self.group)
            return self.build(2 * largest)
        at = 0
        for rank in range(size):
            start, end = (int(value) for value in self.fields[rank][base + 1 + me:base + 3 + me])
            if end - start != out_splits[rank] * out_row:
                raise L3TrainError(f"shared-memory all-to-all: rank {self.global_ranks[rank]} sends {end - start} "
                                   f"bytes, this rank expects {out_splits[rank] * out_row} (split sizes disagree)")
            received[at:at + end - start].copy_(self._buffer(rank, parity)[start:end])
            at += end - start
        return True


# Exchanges by group: id(group) -> (group, exchange); the group is kept so its id is not reused.
_exchanges: dict[int, tuple[dist.ProcessGroup, SharedMemoryExchange]] = {}


def enable_shared_memory(group: dist.ProcessGroup) -> bool:
    """Let `group`'s all-to-alls go through shared memory where its ranks share this host
    (collective over `group`; every rank returns the same answer). True when they do."""
    if id(group) in _exchanges:
        return True
    if dist.get_backend(group) != "gloo" or not 1 < dist.get_world_size(group) <= MAX_RANKS:
        return False
    identity = (socket.gethostname(), _boot_id(), _pid_namespace(), os.getpid(), _usable_here())
    identities: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(identities, identity, group=group)
    pids = [pid for *_, pid, _ in identities]
    # One host, and one process namespace: a waiting rank checks the others' liveness by pid.
    shared = (len({tuple(where) for *where, _, _ in identities}) == 1 and all(usable for *_, usable in identities)
              and all(process_is_running(pid) for pid in pids))
    verdict = torch.tensor(int(shared))
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=group)  # one rank may not see another's pid
    if not verdict.item():
        return False
    timeout = dist.distributed_c10d.default_pg_timeout.total_seconds()
    exchange = SharedMemoryExchange(group, pids, timeout)
    if not exchange.build(MIN_CAPACITY):
        return False
    _exchanges[id(group)] = (group, exchange)
    return True


def shared_memory_exchange(group: dist.ProcessGroup | None) -> SharedMemoryExchange | None:
    """`group`'s shared-memory exchange, if `enable_shared_memory` made one."""
    entry = _exchanges.get(id(dist.group.WORLD if group is None else group))
    return None if entry is None else entry[1]


def disable_shared_memory(group: dist.ProcessGroup | None) -> None:
    """Back to gloo for `group` (after an exchange that could not grow its segments)."""
    _exchanges.pop(id(dist.group.WORLD if group is None else group), None)
