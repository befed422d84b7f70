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
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from l3train.allocation import Allocation
from l3train.errors import CliArgumentParser, L3TrainError, run_cli
from l3train.parallel.shard_plan import METHODS, ShardPlan, max_over_mean, plan_shards

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


def check_dataset_tokenizer(prefix: str, allocation: Allocation) -> None:
    """Refuse data tokenized with another tokenizer than the allocation's (when recorded)."""
    from l3train.data.indexed import data_meta_path

    meta_path = data_meta_path(prefix)
    if not meta_path.is_file():
        return
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise L3TrainError(f"{meta_path} is unreadable ({err}); recreate it with tools/preprocess_data.py") from err
    if meta.get("tokenizer_id") not in (None, allocation.tokenizer_id):
        raise L3TrainError(f"dataset {prefix} was tokenized with tokenizer {meta['tokenizer_id']}, but the "
                           f"allocation is for tokenizer {allocation.tokenizer_id}")


def sample_batches(prefix: str, batches: int, global_batch: int, seq_length: int, seed: int) -> np.ndarray:
    """Token ids [batches, global_batch, seq_length]: random non-overlapping windows."""
    from l3train.data.dataset import check_indexed_dataset

    itemsize, _ = check_indexed_dataset(prefix)
    with warnings.catch_warnings():
        # megatron-core warns at import that Apex/Transformer Engine are absent.
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    dataset = IndexedDataset(prefix)
    windows = int(np.sum(dataset.sequence_lengths, dtype=np.int64)) // seq_length
    needed = batches * global_batch
    if needed > windows:
        raise L3TrainError(f"dataset {prefix} has {windows} windows of {seq_length} tokens, fewer than "
                           f"the {batches} x {global_batch} requested; lower --batches or --global-batch")
    chosen = np.random.default_rng(seed).choice(windows, size=needed, replace=False)
    tokens = [dataset.bin_reader.read(dtype=dataset.index.dtype, count=seq_length,
                                      offset=int(window) * seq_length * itemsize) for window in chosen]
    return np.stack(tokens).astype(np.int64).reshape(batches, global_batch, seq_length)


@dataclass
class Report:
    """What the table shows for one plan."""

    plan: ShardPlan
    work_share: np.ndarray  # planned work per shard / total
    measured: np.ndarray | None  # [batches, shards] Σ d_t per batch, or None without data

    @property
    def measured_share(self) -> np.ndarray | None:
        if self.measured is None:
            return None
        total = self.measured.sum(axis=0)
        return total / max(int(total.sum()), 1)


def build_report(plan: ShardPlan, allocation: Allocation, batches: np.ndarray | None) -> Report:
    work = plan.work_per_shard(allocation.token_frequencies)
    share = work / work.sum() if work.sum() > 0 else np.zeros_like(work)
    measured = None if batches is None else np.stack([plan.measured_work(batch) for batch in batches])
    return Report(plan, share, measured)


def print_reports(reports: list[Report]) -> None:
    with_data = reports[0].measured is not None
    columns = ["tokens", "rows", "work %"] + (["measured %"] if with_data else [])
    widths = [7, 9, 8] + ([11] if with_data else [])
    block = sum(widths) + 3
    print(("shard " + "".join(f"{r.plan.method:^{block}}" for r in reports)).rstrip())
    print(("      " + "".join("".join(f"{c:>{w}}" for c, w in zip(columns, widths)) + "   " for _ in reports)).rstrip())
    for shard in range(reports[0].plan.num_shards):
        line = f"{shard:>5} "
        for report in reports:
            cells = [f"{report.plan.tokens_per_shard()[shard]:,}", f"{report.plan.rows_per_shard()[shard]:,}",
                     f"{100 * report.work_share[shard]:.2f}"]
            if with_data:
                cells.append(f"{100 * report.measured_share[shard]:.2f}")
            line += "".join(f"{c:>{w}}" for c, w in zip(cells, widths)) + "   "
        print(line.rstrip())

    print()
    print(f"{'imbalance (max/mean)':<32}" + "".join(f"{r.plan.method:>12}" for r in reports))
    rows = [("rows", [max_over_mean(r.plan.rows_per_shard()) for r in reports]),
            ("planned work", [max_over_mean(r.work_share) for r in reports])]
    if with_data:
        per_batch = [[max_over_mean(batch) for batch in r.measured] for r in reports]
        rows += [("measured work, all batches", [max_over_mean(r.measured.sum(axis=0)) for r in reports]),
                 ("measured work, per batch mean", [float(np.mean(b)) for b in per_batch]),
                 ("measured work, per batch worst", [float(np.max(b)) for b in per_batch])]
    for name, values in rows:
        print(f"  {name:<30}" + "".join(f"{v:>12.3f}" for v in values))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
    print_reports([build_report(plans[m], allocation, batches) for m in methods])
    if args.output is not None:
        plans[args.method].save(args.output)
        print(f"\nwrote the {args.method} plan to {args.output} (allocation {plans[args.method].allocation_hash})")
    return 0


if __name__ == "__main__":
    run_cli(main)
