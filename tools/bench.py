#!/usr/bin/env python
"""The benchmark suite: every figure a ratio measured side by side in one run.

1. Training tokens/s of the L³ model ÷ its iso-FLOP dense model and ÷ its iso-sparse MoE, each
   ratio with a 95% interval (the real trainer, same batch, precision and threads; all three
   models' ranks alive at once, taking turns of a few steps: l3train.benchmarks.turns), on 1
   and 2 ranks (sharded L³ rows, experts replicated); each model in peers' units from its
   metrics.jsonl: tokens/s and model TFLOP/s per device, MFU (n/a unless the device's peak is
   known: l3train/trainer/throughput.py's GPU table or `training.peak_tflops=...`), peak memory.
2. The L³ model's step time per phase on 2 ranks and where its steps wait (each collective's
   transfer and waiting for a later rank), from `training.profile_steps`; and what the
   sharded rows' exchanges cost at the L³ config's sizes (`l3train.benchmarks.exchange`):
   each collective with the ranks aligned, and whether an exchange overlaps computation.
3. The core library (`l3train.benchmarks.core`, as tools/bench_core.py): fast LZW ÷ the
   paper's loop on ≥ 5M tokens; the CPU kernel, the sorted torch path and the padded
   baseline, L³ forward+backward time, peak memory and useful FLOP/s ÷ a dense matmul's;
   preprocessing tokens/s.

Writes JSON (`--json`) and a markdown report with the machine's description (`--output`,
default docs/benchmarks.md). The defaults use the quick start's data and configs:

    python tools/bench.py                                   # ~4 min on 2 cores
    python tools/bench.py --turns 2 --skip-core             # a quick look
    python tools/bench.py --ranks 1 --skip-core parallel.zero_stage=0 --output /tmp/zero0.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from l3train.benchmarks.core import machine
from l3train.benchmarks.exchange import check_sharded_rows, measure_exchanges, report_lines
from l3train.benchmarks.training import (PROFILED_STEPS, THROUGHPUT_HEADER, UNITS_HEADER, measure_throughput,
                                          median_interval, profile_phases, ratio_cell, report_text, units_rows,
                                          write_report)
from l3train.config import load_config
from l3train.errors import CliArgumentParser, L3TrainError, run_cli
from l3train.utils.atomic import atomic_write_text

L3, DENSE, MOE = "configs/tiny_l3.yaml", "configs/tiny_dense.yaml", "configs/tiny_moe.yaml"
DATA_PREFIX = "data/indexed/stdlib_docstrings_text_document"
CORPUS, TOKENIZER = "data/corpus/stdlib_docstrings.jsonl", "data/tokenizer/spm_bpe_2048.model"


def core_lines(args: argparse.Namespace) -> list[str]:
    from l3train.allocation import fast_lzw_counts, lzw_allocation
    from l3train.benchmarks.core import bench_attention, bench_lzw, bench_preprocessing, load_documents

    lines: list[str] = []
    tokens, offsets = load_documents(args.data_prefix, 5_000_000)
    bench_lzw(tokens, offsets, 2048, 1, log=lines.append)
    codewords = fast_lzw_counts(tokens, 2048, offsets)
    rows = lzw_allocation(codewords.counts, codewords.last_token, 2048, 32 * 2048, 512)
    bench_attention(rows, tokens[:4096].copy(), 128, 3, log=lines.append)
    uniform = np.full(2048, 32, dtype=np.int64)
    bench_attention(uniform, tokens[:4096].copy(), 128, 3, log=lines.append)
    bench_preprocessing(CORPUS, TOKENIZER, log=lines.append)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = CliArgumentParser(prog="tools/bench.py", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--l3", default=L3, help=f"L³ config (default {L3})")
    parser.add_argument("--dense", default=DENSE, help=f"its iso-FLOP dense config (default {DENSE})")
    parser.add_argument("--moe", default=MOE, help=f"its iso-sparse MoE config (default {MOE})")
    parser.add_argument("--steps", type=int, default=5,
                        help="steps per turn (default 5; the first of each turn is not counted)")
    parser.add_argument("--turns", type=int, default=10,
                        help="turns per model, after 3 warm-up steps each (default 10: one turn's ratio can "
                             "be 10-20%% off on a shared machine; the table gives each median's 95%% interval)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts to measure")
    parser.add_argument("--data-prefix", default=DATA_PREFIX, help="indexed dataset for the core benchmarks")
    parser.add_argument("--skip-core", action="store_true", help="skip the LZW and layer benchmarks")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"), help="markdown report")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for every model, e.g. parallel.zero_stage=0")
    args = parser.parse_args(argv)
    for path in (args.l3, args.dense, args.moe):
        if not Path(path).is_file():
            raise L3TrainError(f"config {path} not found")
    if max(args.ranks) > 1:  # before the training runs, not after them
        check_sharded_rows(load_config(args.l3, []), args.l3)

    figures: dict = {"machine": machine(), "steps_per_turn": args.steps, "turns": args.turns, "training": {}}
    table = list(THROUGHPUT_HEADER)
    units = list(UNITS_HEADER)
    for nproc in args.ranks:
        print(f"training throughput on {nproc} rank(s), {args.turns} turns of {args.steps} steps per model")
        l3, dense, moe = measure_throughput([args.l3, args.dense, args.moe], nproc, args.steps, args.turns,
                                             args.overrides)
        ratios = {"l3_over_dense": [a / b for a, b in zip(l3.tokens_per_s, dense.tokens_per_s)],
                  "l3_over_moe": [a / b for a, b in zip(l3.tokens_per_s, moe.tokens_per_s)]}
        figures["training"][nproc] = {"l3": l3.tokens_per_s, "dense": dense.tokens_per_s, "moe": moe.tokens_per_s,
                                      **ratios, **{f"{key}_interval": median_interval(ratios[key]) for key in ratios},
                                      "runs": {"l3": l3.runs, "dense": dense.runs, "moe": moe.runs}}
        table.append(f"| {nproc} | {l3.median:,.0f} | {dense.median:,.0f} | {moe.median:,.0f} | "
                     f"{ratio_cell(ratios['l3_over_dense'])} | {ratio_cell(ratios['l3_over_moe'])} |")
        print(table[-1])
        units += units_rows(nproc, {"L³": l3, "dense": dense, "MoE": moe})
        print("\n".join(units[-3:]))
    nproc = max(args.ranks)
    phases, waits = profile_phases(args.l3, nproc, PROFILED_STEPS, args.overrides)
    figures["phases_ms_per_step"], figures["collective_waits"] = {"ranks": nproc, **phases}, waits
    phase_line = ", ".join(f"{name} {ms:.1f} ms" for name, ms in phases.items())
    print(f"L³ step on {nproc} rank(s), rank 0: {phase_line}", *waits, sep="\n")
    exchanges = []
    if nproc > 1:
        figures["exchanges"] = measure_exchanges(args.l3, nproc)
        exchanges = report_lines(figures["exchanges"])
        print("\n".join(exchanges))
    core = [] if args.skip_core else core_lines(args)
    figures["core"] = core
    print("\n".join(core))

    write_report(args.output, report_text(figures["machine"], args, table, units, nproc, phases, waits,
                                              exchanges, core))
    if args.json:
        atomic_write_text(args.json, json.dumps(figures, indent=1))
    print(f"wrote {args.output}" + (f" and {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)
