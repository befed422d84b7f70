"""How well a shard plan of the L³ rows balances memory and work (tools/shard_plan.py).

A shard stores its tokens' rows (memory ~ rows) and computes the layer for every position
whose token it owns (work ~ Σ d_t over those positions; docs/sharding.md). The planned
work comes from the allocation's unigram frequencies (f_t·d_t); the measured work from
real batches: random non-overlapping windows of a dataset's token stream, EOD tokens
included as training sees them. A step waits for the most loaded shard of that step, so
the per-batch imbalance matters, not only the average.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from l3train.allocation import Allocation
from l3train.data.indexed import IndexedDocuments, read_meta
from l3train.errors import L3TrainError
from l3train.parallel.shard_plan import ShardPlan, max_over_mean


def check_dataset_tokenizer(prefix: str, allocation: Allocation) -> None:
    """Refuse data tokenized with another tokenizer than the allocation's (when recorded)."""
    recorded = read_meta(prefix).get("tokenizer_id")
    if recorded not in (None, allocation.tokenizer_id):
        raise L3TrainError(f"dataset {prefix} was tokenized with tokenizer {recorded}, but the "
                           f"allocation is for tokenizer {allocation.tokenizer_id}")


def sample_batches(prefix: str, batches: int, global_batch: int, seq_length: int, seed: int) -> np.ndarray:
    """Token ids [batches, global_batch, seq_length]: random non-overlapping windows."""
    documents = IndexedDocuments(prefix)
    windows = documents.num_tokens // seq_length
    needed = batches * global_batch
    if needed > windows:
        raise L3TrainError(f"dataset {prefix} has {windows} windows of {seq_length} tokens, fewer than "
                           f"the {batches} x {global_batch} requested; lower --batches or --global-batch")
    chosen = np.random.default_rng(seed).choice(windows, size=needed, replace=False)
    tokens = [documents.read(int(window) * seq_length, seq_length) for window in chosen]
    return np.stack(tokens).astype(np.int64).reshape(batches, global_batch, seq_length)


@dataclass
class PlanBalance:
    """The balance figures of one plan, as the table shows them."""

    plan: ShardPlan
    work_share: np.ndarray  # planned work per shard / total
    measured: np.ndarray | None  # [batches, shards] Σ d_t per batch, or None without data

    @property
    def measured_share(self) -> np.ndarray | None:
        if self.measured is None:
            return None
        total = self.measured.sum(axis=0)
        return total / max(int(total.sum()), 1)


def plan_balance(plan: ShardPlan, allocation: Allocation, batches: np.ndarray | None) -> PlanBalance:
    """Planned work shares of `plan`, and the measured work on `batches` when given."""
    work = plan.work_per_shard(allocation.token_frequencies)
    share = work / work.sum() if work.sum() > 0 else np.zeros_like(work)
    measured = None if batches is None else np.stack([plan.measured_work(batch) for batch in batches])
    return PlanBalance(plan, share, measured)


def _per_shard_table(balances: list[PlanBalance]) -> list[str]:
    """One column block per plan: tokens, rows, work % (and measured %) of every shard."""
    with_data = balances[0].measured is not None
    columns = ["tokens", "rows", "work %"] + (["measured %"] if with_data else [])
    widths = [7, 9, 8] + ([11] if with_data else [])
    block = sum(widths) + 3
    lines = [("shard " + "".join(f"{b.plan.method:^{block}}" for b in balances)).rstrip(),
             ("      " + "".join("".join(f"{c:>{w}}" for c, w in zip(columns, widths)) + "   "
                                 for _ in balances)).rstrip()]
    for shard in range(balances[0].plan.num_shards):
        line = f"{shard:>5} "
        for balance in balances:
            cells = [f"{balance.plan.tokens_per_shard()[shard]:,}", f"{balance.plan.rows_per_shard()[shard]:,}",
                     f"{100 * balance.work_share[shard]:.2f}"]
            if with_data:
                cells.append(f"{100 * balance.measured_share[shard]:.2f}")
            line += "".join(f"{c:>{w}}" for c, w in zip(cells, widths)) + "   "
        lines.append(line.rstrip())
    return lines


def _imbalance_table(balances: list[PlanBalance]) -> list[str]:
    """max/mean over shards of rows, planned and measured work, one column per plan."""
    lines = [f"{'imbalance (max/mean)':<32}" + "".join(f"{b.plan.method:>12}" for b in balances)]
    rows = [("rows", [max_over_mean(b.plan.rows_per_shard()) for b in balances]),
            ("planned work", [max_over_mean(b.work_share) for b in balances])]
    if balances[0].measured is not None:
        per_batch = [[max_over_mean(batch) for batch in b.measured] for b in balances]
        rows += [("measured work, all batches", [max_over_mean(b.measured.sum(axis=0)) for b in balances]),
                 ("measured work, per batch mean", [float(np.mean(m)) for m in per_batch]),
                 ("measured work, per batch worst", [float(np.max(m)) for m in per_batch])]
    lines += [f"  {name:<30}" + "".join(f"{v:>12.3f}" for v in values) for name, values in rows]
    return lines


def format_balances(balances: list[PlanBalance]) -> str:
    """The per-shard table and the imbalance summary of plans side by side (the first one
    leads)."""
    return "\n".join(_per_shard_table(balances) + [""] + _imbalance_table(balances))
