#!/usr/bin/env python
"""Compare training runs: a markdown table and loss plots from what the trainer wrote.

Studies compare dense and L³ models at matched active parameters, so the table puts the
parameter and FLOP accounting (l3train/sizing/accounting.py) next to the losses:
run, family (dense, L³, MoE or L³+MoE, from l3.after_blocks and moe.blocks), total and active parameters,
forward FLOPs per token, tokens seen, final train loss, final and best validation loss.
Two plots: loss against tokens for every run (train lines, validation markers), and
final validation loss against active parameters: every run as a point, and per family a
line through the best run of each size.

Inputs are read, never written: each run's config.yaml and metrics.jsonl, and for L³
runs the allocation file the config names (its mean rows per token occurrence sets the
active parameters; relative paths resolve from the current directory, as in training).

    python tools/report.py runs/studies/lr --output reports/lr          # a sweep (launch/sweep.py's study.json)
    python tools/report.py runs/study --output reports/study             # a tools/study.py directory (plan.json)
    python tools/report.py runs/dense-1 runs/l3-1 --output reports/pair   # run directories

Writes DIR/report.md, DIR/loss_vs_tokens.png and DIR/val_loss_vs_active_params.png,
each atomically; if one exists already, nothing is written unless --overwrite is given.
A run directory given explicitly must hold a config.yaml and at least one logged training
step; runs of a study that have not logged a step yet are skipped with a warning.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from l3train.analysis.report import collect_runs, report_files, write_report
from l3train.errors import CliArgumentParser, run_cli
from l3train.utils.outputs import add_overwrite_argument, refuse_existing


def main(argv: list[str] | None = None) -> int:
    parser = CliArgumentParser(prog="tools/report.py", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, metavar="STUDY_DIR_OR_RUN_DIR")
    parser.add_argument("--output", required=True, type=Path, help="directory for report.md and the plots")
    add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    refuse_existing(report_files(args.output), "a report of tools/report.py", args.overwrite)
    runs = collect_runs(args.paths)
    best = write_report(runs, args.output)
    print(f"report of {len(runs)} run(s) in {args.output}"
          + (f"; best final val loss {best.final_val:.4f} ({best.name})" if best else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)
