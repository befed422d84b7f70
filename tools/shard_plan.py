#!/usr/bin/env python
"""Plan which shard owns which token's L³ rows, and show how well it balances.

L³ routing is static (token id -> its rows), so the owner of every row can be fixed
before training. A shard stores its tokens' rows (memory ~ rows) and computes the layer
for every position of the global batch whose token it owns (work ~ Σ d_t over those
positions). This tool builds the balanced plan ("lpt": both work and rows balanced; see
l3train/parallel/shard_plan.py) and prints it next to the naive split into contiguous
id ranges of equal row count, per shard:

    tokens, rows, planned work % (from the allocation's unigram frequencies, f_t·d_t)
    measured work % (with --data-prefix: Σ d_t over the positions of real batches)

and the imbalance max/mean of each. With --data-prefix, B batches of G sequences of S
tokens are drawn as random non-overlapping S-token windows of the dataset's token stream
(EOD tokens included, as training sees them; fixed --seed), and the per-batch imbalance
is shown too: a step waits for the most loaded shard of that step.

Examples:

    python tools/shard_plan.py --allocation data/allocation/lzw_v32768_k128.npz --shards 4

    python tools/shard_plan.py --allocation data/allocation/lzw_v32768_k128.npz --shards 4 \\
        --data-prefix data/indexed/stdlib_docstrings_text_document \\
        --batches 20 --global-batch 16 --seq-length 128 --output data/shard_plan_4.npz

--output writes the plan of --method (default lpt) as an .npz that records the hash of
its allocation; `ShardPlan.load(path, expect_rows_per_token=...)` refuses it for another.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from l3train.allocation import Allocation
from l3train.analysis.shard_stats import check_dataset_tokenizer, format_balances, plan_balance, sample_batches
from l3train.errors import CliArgumentParser, L3TrainError, run_cli
from l3train.parallel.shard_plan import METHODS, plan_shards
from l3train.utils.outputs import add_overwrite_argument, refuse_existing

DATA_DEFAULTS = {"batches": 20, "global_batch": 16, "seq_length": 128}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allocation", required=True, metavar="FILE",
                        help="allocation .npz from tools/lzw_allocate.py (rows and unigram frequencies)")
    parser.add_argument("--shards", required=True, type=int, metavar="N", help="number of shards (ranks)")
    parser.add_argument("--method", choices=METHODS, default="lpt",
                        help="plan written by --output, shown first (default lpt)")
    data = parser.add_argument_group("measured work on real batches")
    data.add_argument("--data-prefix", metavar="PREFIX", help="Megatron indexed dataset <PREFIX>.bin/.idx")
    data.add_argument("--batches", type=int, metavar="B",
                      help=f"batches to measure (default {DATA_DEFAULTS['batches']})")
    data.add_argument("--global-batch", type=int, metavar="G",
                      help=f"sequences per batch (default {DATA_DEFAULTS['global_batch']})")
    data.add_argument("--seq-length", type=int, metavar="S",
                      help=f"tokens per sequence (default {DATA_DEFAULTS['seq_length']})")
    data.add_argument("--seed", type=int, default=0, help="seed of the window choice (default 0)")
    parser.add_argument("--output", metavar="FILE.npz", help="write the --method plan here")
    add_overwrite_argument(parser)
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error(f"--shards must be at least 1, got {args.shards}")
    for name, default in DATA_DEFAULTS.items():
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if value is not None and args.data_prefix is None:
            parser.error(f"{flag} needs --data-prefix (it sizes the measured batches)")
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
        setattr(args, name, default if value is None else value)
    if args.output is not None and Path(args.output).is_dir():
        parser.error(f"--output {args.output} is a directory; give a file name")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refuse_existing([args.output] if args.output else [], "a shard plan file", args.overwrite)
    allocation = Allocation.load(args.allocation)
    if args.shards > allocation.vocab_size:
        raise L3TrainError(f"--shards {args.shards} exceeds the vocab size {allocation.vocab_size}: "
                           "a token's rows are never split, so each shard needs a token")
    batches = None
    if args.data_prefix is not None:
        check_dataset_tokenizer(args.data_prefix, allocation)
        batches = sample_batches(args.data_prefix, args.batches, args.global_batch, args.seq_length, args.seed)

    print(f"allocation {args.allocation}: vocab {allocation.vocab_size:,}, v = {allocation.budget_v:,} rows, "
          f"k = {allocation.cap_k}, planned work from unigram counts of "
          f"{int(allocation.token_frequencies.sum()):,} tokens")
    if batches is not None:
        print(f"measured on {args.batches} batches x {args.global_batch} x {args.seq_length} tokens of "
              f"{args.data_prefix} (random windows, seed {args.seed})")
    print(f"{args.shards} shards; work = Σ d_t over a shard's positions, rows = rows stored\n")
    methods = [args.method] + [m for m in METHODS if m != args.method]
    plans = {m: plan_shards(allocation.rows_per_token, allocation.token_frequencies, args.shards, m)
             for m in methods}
    print(format_balances([plan_balance(plans[m], allocation, batches) for m in methods]))
    if args.output is not None:
        plans[args.method].save(args.output)
        print(f"\nwrote the {args.method} plan to {args.output} (allocation {plans[args.method].allocation_hash})")
    return 0


if __name__ == "__main__":
    run_cli(main)
