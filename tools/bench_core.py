#!/usr/bin/env python
"""Benchmark the core library in one run, side by side (this machine is noisy: read ratios).

1. LZW codeword counting: the fast C trie against the paper's reference loop on the same
   >= 5M tokens (identical output is asserted).
2. L³ row attention forward+backward at an LZW allocation with cap k: the CPU kernel and
   the sorted block-diagonal torch implementation against the naive baseline that gathers
   every position's rows padded to the batch's largest d_t (the per-position loop of the
   tests is ~1000x slower still), and the kernel's and the torch path's useful FLOP/s
   against a dense matmul's. Peak memory is the growth of the peak resident set
   of a fresh child process per variant over its state before the timed passes.

Tokens come from a Megatron indexed dataset (`--data-prefix`, e.g. the default corpus
built by launch/quickstart.sh), cycled until `--tokens` are reached.

    python tools/bench_core.py --data-prefix data/indexed/stdlib_docstrings_text_document --vocab-size 2048
"""

from __future__ import annotations

import argparse
from pathlib import Path

from l3train.allocation import fast_lzw_counts, lzw_allocation
from l3train.benchmarks.core import bench_attention, bench_lzw, load_documents
from l3train.errors import CliArgumentParser, L3TrainError, run_cli


def main() -> int:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-prefix", required=True, help="Megatron indexed dataset to take tokens from")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=5_000_000, help="tokens for the LZW benchmark")
    parser.add_argument("--budget", type=int, default=0, help="rows v (default: 32 × vocab)")
    parser.add_argument("--cap", type=int, default=512, help="rows per token cap k")
    parser.add_argument("--positions", type=int, default=4096, help="positions per L³ batch")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (the best is reported)")
    args = parser.parse_args()

    if not Path(args.data_prefix + ".idx").is_file():
        raise L3TrainError(f"--data-prefix {args.data_prefix}: no {args.data_prefix}.idx; build one with "
                           f"tools/preprocess_data.py (launch/quickstart.sh makes the default corpus's)")
    tokens, offsets = load_documents(args.data_prefix, args.tokens)
    bench_lzw(tokens, offsets, args.vocab_size, args.repeats)
    codewords = fast_lzw_counts(tokens, args.vocab_size, offsets)
    rows = lzw_allocation(codewords.counts, codewords.last_token, args.vocab_size,
                          args.budget or 32 * args.vocab_size, args.cap)
    bench_attention(rows, tokens[:args.positions].copy(), args.d_model, args.repeats)
    return 0


if __name__ == "__main__":
    run_cli(main)
