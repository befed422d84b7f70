#!/usr/bin/env python
"""Benchmark generation with the L³ tables resident, in host memory and on disk, side by side.

For each model (random weights, written once under --work-dir as consolidated checkpoints):
decode tokens/s at each --batch for resident tables, host memory with and without
prefetch, and disk with prefetch (warm page cache), in interleaved repetitions (this
machine is noisy: read the ratios); the staging counters (bytes staged per token, stalls,
time waited) and where a step's time goes; and the resident memory that loading and generating add, per placement, in
a fresh process each, for the model with large tables (l3train.benchmarks.inference says
exactly what is measured).

Models: `tiny_l3` is configs/tiny_l3.yaml (LZW allocation, 2 × 16 MiB of tables);
`large_tables` is the same backbone with a uniform allocation of 512 rows per token
(2 × 512 MiB), so the disk placement's memory can be told apart from the tables'.

    python tools/bench_inference.py
    python tools/bench_inference.py --models tiny_l3 --batches 1 --reps 3 --new-tokens 16

Writes --json (default <work-dir>/inference_benchmarks.json) and --markdown (default
docs/inference_benchmarks.md); both are replaced on every run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

from l3train.benchmarks.core import machine
from l3train.benchmarks.inference import (BenchModel, bench_memory, bench_speed, prepare_checkpoint, table_bytes,
                                          write_report)
from l3train.errors import CliArgumentParser, run_cli

MODELS = {
    "tiny_l3": (BenchModel("tiny_l3", "configs/tiny_l3.yaml"),
                "configs/tiny_l3.yaml: 4 blocks d=128, L³ after blocks 1 and 2, LZW allocation v=32,768, k=128"),
    "large_tables": (BenchModel("large_tables", "configs/tiny_l3.yaml", uniform_rows_per_token=512, measure_memory=True),
                     "the tiny_l3 backbone with a uniform allocation of 512 rows per token (v=1,048,576)"),
}


def main() -> int:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--reps", type=int, default=9, help="interleaved repetitions per batch size")
    parser.add_argument("--new-tokens", type=int, default=32, help="new tokens per sequence and repetition")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the prefetch thread "
                                                               "gets the other core)")
    parser.add_argument("--device", default="cpu", help="compute device: cpu, or cuda (host and disk tables staged "
                                                       "through a pinned buffer; memory figures are the host's)")
    parser.add_argument("--memory-batch", type=int, default=16, help="batch size of the memory measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement (large_tables)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench_inference"),
                        help="checkpoints and table files (made once, reused)")
    parser.add_argument("--json", type=Path, help="results (default <work-dir>/inference_benchmarks.json)")
    parser.add_argument("--markdown", type=Path, default=Path("docs/inference_benchmarks.md"))
    args = parser.parse_args()
    if min(args.batches) < 1 or args.reps < 1 or args.threads < 1 or args.memory_batch < 1:
        parser.error("--batches, --reps, --threads and --memory-batch must be at least 1")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the first token comes from the prefill, which is not timed)")
    torch.set_num_threads(args.threads)
    table_dir = args.work_dir / "tables"
    results = {"machine": machine(), "load_average_at_start": os.getloadavg()[1], "threads": args.threads, "reps": args.reps, "new_tokens": args.new_tokens,
               "memory_batch": args.memory_batch, "models": []}
    for name in args.models:
        model, description = MODELS[name]
        checkpoint = prepare_checkpoint(model, args.work_dir)
        size = table_bytes(checkpoint)
        print(f"{name}: {description}; tables {size / 2**20:.1f} MiB")
        entry = {"name": name, "description": description, "table_bytes": size,
                 "speed": bench_speed(checkpoint, table_dir, args.batches, args.reps, args.new_tokens,
                                      device=torch.device(args.device))}
        if model.measure_memory and not args.no_memory:
            entry["memory"] = bench_memory(checkpoint, table_dir, args.memory_batch, args.new_tokens, args.threads)
        results["models"].append(entry)
    results["load_average_at_end"] = os.getloadavg()[1]
    command = shlex.join(["python", "tools/bench_inference.py", *sys.argv[1:]])
    write_report(results, args.json or args.work_dir / "inference_benchmarks.json", args.markdown, command)
    print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    run_cli(main)
