#!/usr/bin/env python
"""The L³ study in one command: iso-FLOP dense, L³-LZW, L³-uniform (same v) and iso-sparse
MoE, trained on the same corpus for the same tokens with several seeds, evaluated on its
held-out documents, and reported in docs/results.md (docs/evaluation.md).

From the L³ config (--config) and the corpus (--data-prefix, any dataset written by
tools/preprocess_data.py; default: the config's, i.e. the default corpus), the study
1. builds the corpus's LZW allocation (from its training part) and the uniform one, both
   with v rows and cap k (default: those of the config's allocation file);
2. writes the two L³ configs and sizes the dense and MoE baselines from the LZW one
   (tools/size_configs.py);
3. builds a multiple-choice continuation task from the held-out documents
   (tools/build_mc_task.py; needs the raw corpus, default: the one <prefix>.meta.json names);
4. trains every model with every seed for --steps steps (python -m l3train.train) and
   evaluates each finished run: held-out loss, bits per byte, multiple choice, L³
   diagnostics, logit lens;
5. writes the report (--output) and its plots (in a folder of the report's stem beside it).

Everything lives in --study-dir; a rerun skips what is done and continues interrupted
training from its last checkpoint, so the study can be stopped (Ctrl-C) and restarted at
any time; a larger --seeds adds seeds to a finished study. --steps is the budget: the
default (4 models × 3 seeds × 400 steps) took 20 minutes on 2 idle CPU cores (2026-12-07)
(on a busy machine, --threads 1 is much faster than the default threads).

    python tools/study.py                                   # the default study, ~20 min
    python tools/study.py --steps 5 --seeds 1 --study-dir /tmp/study --output /tmp/study/results.md   # a smoke test
    python tools/study.py --data-prefix data/indexed/other_text_document --study-dir runs/study_other \\
        --output docs/results_other.md

Run it from the repository root (config paths are relative to it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from l3train.errors import CliArgumentParser, L3TrainError, run_cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = CliArgumentParser(prog="tools/study.py", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_l3.yaml",
                        help="L³ config the study starts from (default configs/tiny_l3.yaml)")
    parser.add_argument("--data-prefix", metavar="PREFIX", help="indexed dataset (default: the config's)")
    parser.add_argument("--tokenizer", metavar="MODEL", help="its sentencepiece model (default: the config's for its "
                                                             "own data, else the one <PREFIX>.meta.json names)")
    parser.add_argument("--corpus", metavar="FILE", help="raw corpus the dataset was made from, for the "
                                                         "multiple-choice task (default: from <PREFIX>.meta.json)")
    parser.add_argument("--rows", type=int, metavar="V", help="L³ rows v per layer (default: the config's allocation's)")
    parser.add_argument("--cap", type=int, metavar="K", help="rows per token at most (default: the config's "
                                                             "allocation's)")
    parser.add_argument("--steps", type=int, default=400,
                        help="optimizer steps of every run: the time budget (default 400, ~20 min in all on 2 "
                             "idle cores)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per model (default 3)")
    parser.add_argument("--mc-examples", type=int, default=200, help="questions of the multiple-choice task "
                                                                     "(default 200; 0: no task)")
    parser.add_argument("--study-dir", default="runs/study", help="where configs, runs and results live "
                                                                  "(default runs/study)")
    parser.add_argument("--output", default="docs/results.md", help="the report (default docs/results.md)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output even if tools/study.py did not write it")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads per process (default: all cores); 1 is much faster when other work "
                             "shares the machine")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from l3train.study import REPORT_MARK, resolve_settings, run_study

    output = Path(args.output)
    if output.exists() and not args.overwrite and not output.read_text(errors="replace").startswith(REPORT_MARK):
        raise L3TrainError(f"{output} exists and was not written by tools/study.py; pass --overwrite to replace it, "
                           f"or choose another --output")
    settings = resolve_settings(args.config, args.data_prefix, args.tokenizer, args.corpus, args.rows, args.cap,
                                args.steps, args.seeds, args.study_dir, args.output, args.mc_examples)
    if args.threads is not None and args.threads < 1:
        raise L3TrainError(f"--threads must be >= 1, got {args.threads}")
    report = run_study(settings, argv, progress=not args.quiet, threads=args.threads)
    print(f"wrote {report} and its plots in {report.parent / report.stem}")
    return 0


if __name__ == "__main__":
    run_cli(main)
