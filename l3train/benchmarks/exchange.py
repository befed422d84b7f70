"""What the sharded L³ rows' exchanges cost (tools/bench.py, at several ranks).

With the rows sharded, each micro-batch makes 2 collectives for the route (the split sizes,
then the token ids) and each L³ layer 4 all-to-alls (positions out and outputs back, in
forward and again in backward). Each is a point where every rank waits for the slowest.
This measures, on the real process group and with the real `exchange`, at the sizes a
config's micro-batch gives (positions split evenly over the ranks, as a balanced shard plan
does on average):

- each collective's time when all ranks enter it together (a barrier first): the floor
  the exchanges cost per step, before any waiting for a slower rank; on CPUs through the
  transport training uses between ranks of one host (shared memory:
  l3train.parallel.shared_memory) and through gloo, side by side;
- whether an exchange overlaps with computation: the positions' all-to-all started
  asynchronously while this rank runs `compute_ms` of matrix products, against the same
  all-to-all followed by the same work. The overlap pays where the transport has cores of
  its own; ranks that share their cores with the collectives' threads gain little (on 2
  cores, 0.1-0.3 ms of an exchange's 0.5 ms: docs/benchmarks.md).

    torchrun --nproc_per_node 2 -m l3train.benchmarks.exchange --config configs/tiny_l3.yaml --out figures.json

(`measure_exchanges` launches that and reads the figures.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Collectives of one micro-batch: the route's two, then 4 per L³ layer (2 forward, 2 backward).
ROUTE_COLLECTIVES = 2
COLLECTIVES_PER_LAYER = 4


def exchange_sizes(cfg, world_size: int) -> tuple[int, dict[str, dict[str, int]]]:
    """The positions of `cfg`'s micro-batch on one of `world_size` data-parallel ranks (TP = 1),
    and per collective the rows and bytes that rank sends to the others, positions split evenly."""
    from l3train.config import validate_for_world

    layout = validate_for_world(cfg, world_size)
    positions = layout.micro_batch_size * cfg.data.seq_length
    remote = positions - positions // world_size  # the rank's own share does not leave it
    widths = {"route sizes": (world_size - 1, 1, 8), "route token ids": (remote, 1, 8),
              "positions out": (remote, cfg.model.d_model, 4), "outputs back": (remote, cfg.l3.d_emb + 1, 4)}
    return positions, {name: {"rows": rows, "bytes": rows * width * item}
                       for name, (rows, width, item) in widths.items()}


def _timed(run: Callable[[], None], iterations: int, synchronize: Callable[[], None]) -> float:
    """Median milliseconds of `run`, all ranks entering together (a barrier before each)."""
    import torch.distributed as dist

    times = []
    for _ in range(iterations):
        dist.barrier()
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure_on_world(cfg, iterations: int, compute_ms: float) -> dict:
    """This rank's figures for config `cfg` (call on every rank of an initialised process group)."""
    import torch
    import torch.distributed as dist

    from l3train.parallel import collectives
    from l3train.parallel.collectives import exchange
    from l3train.parallel.shared_memory import enable_shared_memory

    world, rank = dist.get_world_size(), dist.get_rank()
    positions, sizes = exchange_sizes(cfg, world)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # Even split: positions // world to each rank, the remainder to the last.
    split = [positions // world] * world
    split[-1] += positions - sum(split)
    x = torch.randn(positions, cfg.model.d_model, device=device)
    packed = torch.randn(positions, cfg.l3.d_emb + 1, device=device)
    ids = torch.randint(0, cfg.model.vocab_size, (positions,), device=device)
    counts = torch.tensor(split, device=device)
    received = torch.empty_like(counts)
    runs = {"route sizes": lambda: collectives.all_to_all_single(received, counts),
            "route token ids": lambda: exchange(ids, split, split, None),
            "positions out": lambda: exchange(x, split, split, None),
            "outputs back": lambda: exchange(packed, split, split, None)}
    backend_ms = {name: _timed(run, iterations, synchronize) for name, run in runs.items()}
    # Then as training exchanges on this device (parallelize enables shared memory on CPUs).
    shared = device.type == "cpu" and enable_shared_memory(dist.group.WORLD)
    median_ms = {name: _timed(run, iterations, synchronize) for name, run in runs.items()} if shared else backend_ms

    matrix = torch.randn(256, 256, device=device)
    products = _products_for(compute_ms, matrix, synchronize)

    def compute() -> None:
        for _ in range(products):
            matrix @ matrix

    def overlapped() -> None:
        output = torch.empty_like(x)
        work = dist.all_to_all_single(output, x, split, split, async_op=True)
        compute()
        work.wait()

    overlap = {"compute alone": _timed(compute, iterations, synchronize),
               "exchange, then compute": _timed(lambda: (exchange(x, split, split, None), compute()), iterations,
                                                synchronize),
               "exchange overlapped with compute": _timed(overlapped, iterations, synchronize)}
    layers = len(cfg.l3.after_blocks)
    return {"rank": rank, "world_size": world, "device": device.type, "backend": dist.get_backend(),
            "transport": "shared memory" if shared else dist.get_backend(),
            "positions_per_rank": positions, "l3_layers": layers,
            "collectives_per_micro_batch": ROUTE_COLLECTIVES + COLLECTIVES_PER_LAYER * layers,
            "collectives": {name: {**sizes[name], "median_ms": median_ms[name], "backend_ms": backend_ms[name]}
                            for name in runs},
            "overlap_ms": overlap}


def _products_for(compute_ms: float, matrix, synchronize: Callable[[], None]) -> int:
    """How many `matrix @ matrix` take about `compute_ms` on this rank."""
    start = time.perf_counter()
    for _ in range(50):
        matrix @ matrix
    synchronize()
    return max(1, round(compute_ms / 1e3 / ((time.perf_counter() - start) / 50)))


def floor_ms_per_micro_batch(figures: dict) -> float:
    """The collectives' time per micro-batch with no rank ever late: the route's once, the
    layers' exchanges 2 each way per layer, forward and backward."""
    collectives, layers = figures["collectives"], figures["l3_layers"]
    return (collectives["route sizes"]["median_ms"] + collectives["route token ids"]["median_ms"]
            + 2 * layers * (collectives["positions out"]["median_ms"] + collectives["outputs back"]["median_ms"]))


def check_sharded_rows(cfg, config: str) -> None:
    """Refuse (one line) a config `config` whose model has no sharded L³ rows: no exchanges to time."""
    from l3train.errors import L3TrainError

    if not cfg.l3.after_blocks or not cfg.parallel.shard_l3_rows:
        raise L3TrainError(f"{config} has no sharded L³ rows (l3.after_blocks is empty or "
                           f"parallel.shard_l3_rows=false): it makes none of these exchanges; pass an L³ config")


def measure_exchanges(config: str, nproc: int, iterations: int = 200, compute_ms: float = 1.0) -> dict:
    """Launch `nproc` local ranks (torchrun, one thread each on CPU) and return rank 0's figures."""
    from l3train.benchmarks.training import run_local_ranks

    with tempfile.TemporaryDirectory(prefix="l3train-exchange-") as scratch:
        out = Path(scratch) / "figures.json"
        run_local_ranks("l3train.benchmarks.exchange", ["--config", config, "--iterations", str(iterations),
                                                        "--compute-ms", str(compute_ms), "--out", str(out)],
                        nproc, f"exchange benchmark on {nproc} ranks")
        return json.loads(out.read_text())


def report_lines(figures: dict) -> list[str]:
    """Markdown: the collectives' sizes and times, the floor per micro-batch, the overlap test."""
    transport, backend = figures["transport"], figures["backend"]
    lines = [f"| collective | rows sent to other ranks | bytes | ms through {transport} (ranks aligned) | "
             f"ms through {backend} |", "|---|---|---|---|---|"]
    for name, entry in figures["collectives"].items():
        lines.append(f"| {name} | {entry['rows']:,} | {entry['bytes']:,} | {entry['median_ms']:.3f} | "
                     f"{entry['backend_ms']:.3f} |")
    overlap = figures["overlap_ms"]
    gain = overlap["exchange, then compute"] / overlap["exchange overlapped with compute"]
    lines += ["", f"{figures['collectives_per_micro_batch']} collectives per micro-batch "
              f"({figures['l3_layers']} L³ layers), through {transport} as training makes them: at least "
              f"{floor_ms_per_micro_batch(figures):.1f} ms with no rank ever late. Overlap (asynchronous "
              f"{backend}, {figures['device']}): compute alone "
              f"{overlap['compute alone']:.3f} ms, the positions' exchange then that compute "
              f"{overlap['exchange, then compute']:.3f} ms, the exchange started asynchronously under it "
              f"{overlap['exchange overlapped with compute']:.3f} ms ({gain:.2f}× the sequential speed)."]
    return lines


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from l3train.config import load_config
    from l3train.errors import CliArgumentParser

    parser = CliArgumentParser(prog="python -m l3train.benchmarks.exchange", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--compute-ms", type=float, default=1.0)
    parser.add_argument("--out", type=Path, required=True, help="rank 0 writes its figures here (JSON)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [])
    check_sharded_rows(cfg, args.config)
    dist.init_process_group("nccl" if _cuda() else "gloo")
    figures = measure_on_world(cfg, args.iterations, args.compute_ms)
    if figures["rank"] == 0:
        from l3train.utils.atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps(figures, indent=1))
    # Every rank past its last collective; run_cli then ends the process without interpreter
    # finalization, which can abort a gloo process ("terminate called without an active
    # exception": l3train.process.exit_process). Destroying the group first did not prevent it.
    dist.barrier()
    return 0


def _cuda() -> bool:
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return True
    return False


if __name__ == "__main__":
    from l3train.errors import run_cli

    run_cli(main)
