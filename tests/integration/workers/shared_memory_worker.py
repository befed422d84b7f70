"""torchrun worker (3 ranks): the shared-memory all-to-all against gloo's, and how it fails.

0. Ranks that do not share their /dev/shm (each given a directory of its own): every rank
   refuses shared memory for that group, with a warning, and leaves no file behind.
1. `enable_shared_memory` on the world; then exchanges of several dtypes and widths with
   uneven split sizes (zeros included), empty inputs, and one too large for the first
   segments (it goes through gloo and the segments grow): each output must equal
   `dist.all_to_all_single`'s bitwise.
2. Rank 1 stays away from an exchange: ranks 0 and 2 fail with a timeout after their
   (shortened) timeout.
3. Rank 1 exits: ranks 0 and 2 fail at the next exchange within seconds, naming it.

Each rank writes REPORT_DIR/rank<r>.json: its failures, what step 0 gave, the seconds and
messages of the two errors, and the shared-memory files left under /dev/shm by any rank of
this world.

Usage: shared_memory_worker.py REPORT_DIR
"""

import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from l3train.parallel import collectives, shared_memory
from l3train.parallel.shared_memory import MIN_CAPACITY, SHM_DIR, enable_shared_memory, shared_memory_exchange
from l3train.process import exit_process


def exchange_both_ways(rank: int, size: int, rows_by_destination: list[int], width: int, dtype: torch.dtype,
                       failures: list[str]) -> None:
    generator = torch.Generator().manual_seed(1000 * rank + width)
    source = torch.randn(sum(rows_by_destination), width, generator=generator) * 100
    source = source.to(dtype)
    counts = torch.tensor(rows_by_destination)
    received_counts = torch.empty_like(counts)
    collectives.all_to_all_single(received_counts, counts)
    expected_counts = torch.empty_like(counts)
    dist.all_to_all_single(expected_counts, counts)
    if not torch.equal(received_counts, expected_counts):
        failures.append(f"split sizes: {received_counts.tolist()} != {expected_counts.tolist()}")
    recv = received_counts.tolist()
    through_memory = torch.full((sum(recv), width), -1).to(dtype)
    through_gloo = torch.full((sum(recv), width), -2).to(dtype)
    collectives.all_to_all_single(through_memory, source, recv, rows_by_destination)
    dist.all_to_all_single(through_gloo, source, recv, rows_by_destination)
    if not torch.equal(through_memory, through_gloo):
        failures.append(f"{dtype} width {width} splits {rows_by_destination}: outputs differ")


def failed_exchange(x: torch.Tensor) -> dict | None:
    """How an exchange that cannot complete fails: seconds until it raised, and its message."""
    start = time.monotonic()
    try:
        collectives.all_to_all_single(torch.empty_like(x), x)
    except dist.DistError as err:
        return {"seconds": time.monotonic() - start, "message": str(err)}
    return None


def main() -> None:
    report_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    pids: list = [None] * size
    dist.all_gather_object(pids, os.getpid())
    report = {"failures": []}
    failures = report["failures"]
    try:
        private = report_dir / f"shm_rank{rank}"
        private.mkdir()
        shared_memory.SHM_DIR = private  # where this rank makes and looks for segments
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report["private"] = {"enabled": enable_shared_memory(dist.new_group(list(range(size)))),
                                 "left": os.listdir(private), "warnings": [str(w.message) for w in caught]}
        shared_memory.SHM_DIR = SHM_DIR
        if not enable_shared_memory(dist.group.WORLD):
            failures.append("enable_shared_memory refused three ranks of one host")
        exchange = shared_memory_exchange(None)
        # Uneven splits, a zero split, odd widths and several dtypes; then nothing at all.
        for step, (width, dtype) in enumerate([(129, torch.float32), (7, torch.bfloat16), (1, torch.int64),
                                               (33, torch.float64)]):
            exchange_both_ways(rank, size, [(rank + destination + step) % 4 * 5 for destination in range(size)],
                               width, dtype, failures)
        exchange_both_ways(rank, size, [0] * size, 16, torch.float32, failures)
        # Larger than the first segments: through gloo once, then the segments grow.
        large = MIN_CAPACITY // (64 * 4) + 1
        exchange_both_ways(rank, size, [large] * size, 64, torch.float32, failures)
        if exchange.capacity < 3 * large * 64 * 4 or shared_memory_exchange(None) is not exchange:
            failures.append(f"the segments did not grow: {exchange.capacity} bytes")
        exchange_both_ways(rank, size, [large] * size, 64, torch.float32, failures)

        # A rank that does not come: the others time out.
        exchange.timeout_seconds = 1.0
        x = torch.ones(size, 4)
        if rank == 1:
            time.sleep(4)
            os._exit(0)  # and then it is gone
        report["timeout"] = failed_exchange(x)
        exchange.timeout_seconds = 60.0
        report["lost"] = failed_exchange(x)  # rank 1 exits meanwhile
        time.sleep(0.5)
        report["left_in_shm"] = sorted(path.name for path in SHM_DIR.iterdir()
                                       if any(path.name.startswith(f"l3train-{pid}-") for pid in pids))
    except Exception:
        failures.append(traceback.format_exc())
    (report_dir / f"rank{rank}.json").write_text(json.dumps(report))
    exit_process(0)  # no barrier: rank 1 is gone


if __name__ == "__main__":
    main()
