#!/usr/bin/env python
"""Benchmark preprocessing a corpus of many shards: tokens/s at 1 and 2 workers, and where time goes.

The source corpus (JSONL) is repeated --repeat times and cut into --shards files cycling
through JSONL.gz, Parquet, JSONL.zst and JSONL; tools/preprocess_data.py's library call
tokenizes them with 1 and 2 workers, alternately, --repeats times (medians reported); then
one worker's phases are timed apart: reading and parsing, tokenizing, writing.

    python tools/bench_data.py --corpus data/corpus/stdlib_docstrings.jsonl \\
        --tokenizer data/tokenizer/spm_bpe_2048.model
"""

from __future__ import annotations

import argparse
from pathlib import Path

from l3train.benchmarks.data import bench_preprocess_workers
from l3train.errors import CliArgumentParser, L3TrainError, run_cli


def main() -> int:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus/stdlib_docstrings.jsonl"),
                        help="source JSONL corpus (default: the quick start's)")
    parser.add_argument("--tokenizer", type=Path, default=Path("data/tokenizer/spm_bpe_2048.model"))
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=8, help="times the corpus is repeated (default 8)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per worker count (default 2)")
    args = parser.parse_args()
    for path, flag in ((args.corpus, "--corpus"), (args.tokenizer, "--tokenizer")):
        if not path.is_file():
            raise L3TrainError(f"{flag} {path} not found (launch/quickstart.sh builds the default corpus and tokenizer)")
    if min(args.shards, args.repeat, args.repeats) < 1:
        raise L3TrainError("--shards, --repeat and --repeats must be at least 1")
    bench_preprocess_workers(args.corpus, args.tokenizer, args.shards, args.repeat, args.repeats)
    return 0


if __name__ == "__main__":
    run_cli(main)
