"""L³ diagnostics: how each lookup layer spreads its softmax over a token's rows.

Per L³ layer, over every position of an evaluation text:
- the softmax entropy H = -Σ_r p_r log p_r of the position's weights over its token's d_t
  rows: 0 when one row takes all the weight, log d_t when all rows weigh the same;
- the top-1 weight max_r p_r;
- per token, the fraction of its d_t rows that receive at least 1% of the weight at some
  position (`ROW_THRESHOLD`): rows that never do are unused on this text;
- the entropy against d_t: whether tokens given more rows spread over more of them.

The weights are recomputed from outside the model: a forward hook on each
`LargeLookupLayer` captures its inputs (normed hidden states and token ids), and the layer's
own key table and bounds give softmax(K_t x) for every position, one token at a time, in
fp64. This reference computation is independent of the training kernels, which return only
each position's entropy. Of the key table it reads the rows of the batch's tokens only,
gathered on the table's device (`batch_rows`); it needs the plain model (`l3train.eval.loading`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from l3train.model.l3_layer import LargeLookupLayer, LookupRoutes
from l3train.model.llama import DecoderLM

ROW_THRESHOLD = 0.01  # a row "receives weight" at a position when its softmax weight is at least this


def lookup_weights(x: Tensor, token_ids: Tensor, bounds: Tensor, keys: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(token, its positions, their weights (positions, d_t)) for every distinct token of
    `token_ids` (N,), with x (N, d_in): softmax(K_t x) in fp64."""
    order = torch.argsort(token_ids, stable=True)
    unique, counts = torch.unique_consecutive(token_ids[order], return_counts=True)
    for token, positions in zip(unique.tolist(), torch.split(order, counts.tolist())):
        rows = keys[int(bounds[token]):int(bounds[token + 1])].double()
        yield token, positions, torch.softmax(x[positions].double() @ rows.t(), dim=-1)


@dataclass
class BatchRows:
    """The key rows of a batch's distinct tokens, on the host, and the batch re-indexed to them."""

    tokens: Tensor  # (U,) the distinct token ids, ascending
    starts: Tensor  # (U,) each one's first row in the whole table
    keys: Tensor  # (Σ d_t, d_in) their rows, in token order
    local_bounds: Tensor  # (U + 1,) row offsets into `keys`
    local_ids: Tensor  # (N,) each position's index into `tokens`


def batch_rows(keys: Tensor, bounds: Tensor, token_ids: Tensor) -> BatchRows:
    """Gather, on the table's device, only the rows of the tokens in `token_ids`, then copy them
    to the host: a GPU's tables are gigabytes, a batch's rows a few megabytes."""
    bounds = bounds.to(keys.device)
    tokens, local_ids = torch.unique(token_ids.to(keys.device), return_inverse=True)
    starts, counts = bounds[tokens], bounds[tokens + 1] - bounds[tokens]
    local_bounds = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    # Row r of the gathered block belongs to token u = owner[r]: table row starts[u] + (r - local_bounds[u]).
    owner = torch.repeat_interleave(torch.arange(len(tokens), device=keys.device), counts)
    rows = starts[owner] + torch.arange(len(owner), device=keys.device) - local_bounds[owner]
    return BatchRows(tokens.cpu(), starts.cpu(), keys[rows].cpu(), local_bounds.cpu(), local_ids.cpu())


@dataclass
class LayerDiagnostics:
    """What one L³ layer did over an evaluation text."""

    block: int  # the block the layer follows
    entropy: np.ndarray  # per position, nats
    top1: np.ndarray  # per position
    rows: np.ndarray  # d_t of each position's token
    row_max_weight: np.ndarray  # (v,) the largest weight each row received at any position
    token_counts: np.ndarray  # (vocab,) positions of each token
    bounds: np.ndarray  # (vocab + 1,) the layer's row offsets

    def rows_used_fraction(self, threshold: float = ROW_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
        """(tokens seen, fraction of each one's rows that received at least `threshold` weight)."""
        seen = np.flatnonzero(self.token_counts)
        used = np.add.reduceat((self.row_max_weight >= threshold).astype(np.int64), self.bounds[:-1])
        return seen, used[seen] / np.diff(self.bounds)[seen]

    def entropy_by_rows(self) -> list[tuple[int, int, float]]:
        """(d_t, positions, mean entropy) for every d_t among the positions, ascending."""
        values, inverse, counts = np.unique(self.rows, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=self.entropy)
        return [(int(d), int(n), float(s / n)) for d, n, s in zip(values, counts, sums)]

    def summary(self) -> dict[str, float | int]:
        seen, fractions = self.rows_used_fraction()
        spread = self.rows > 1  # d_t = 1 has entropy 0 by construction
        return {
            "positions": len(self.entropy),
            "tokens_seen": len(seen),
            "mean_rows_per_position": float(self.rows.mean()),
            "entropy_mean": float(self.entropy.mean()),
            "entropy_median": float(np.median(self.entropy)),
            # H / log d_t: 1 is a uniform spread over the token's rows, whatever d_t is.
            "normalized_entropy_mean": float((self.entropy[spread] / np.log(self.rows[spread])).mean())
            if spread.any() else 0.0,
            "top1_mean": float(self.top1.mean()),
            "top1_median": float(np.median(self.top1)),
            "rows_used_fraction_mean": float(fractions.mean()),
            # Weighted by how often each token occurs: the fraction a typical position's token uses.
            "rows_used_fraction_weighted": float(np.average(fractions, weights=self.token_counts[seen])),
        }


class _LayerRecorder:
    """Accumulates one layer's per-position figures over the forward passes."""

    def __init__(self, block: int, layer: LargeLookupLayer) -> None:
        self.block, self.layer = block, layer
        self.entropy: list[Tensor] = []
        self.top1: list[Tensor] = []
        self.rows: list[Tensor] = []
        self.row_max = torch.zeros(layer.num_rows, dtype=torch.float64)
        self.counts = torch.zeros(len(layer.bounds) - 1, dtype=torch.long)

    def __call__(self, module: LargeLookupLayer, args: tuple[Tensor, Tensor | LookupRoutes], _output: object) -> None:
        x, ids = args
        token_ids = LookupRoutes.of(ids).token_ids.reshape(-1)
        batch = batch_rows(module.rows.tables()[0].detach(), module.bounds, token_ids)
        x = x.detach().reshape(-1, x.shape[-1]).cpu()
        for local, positions, weights in lookup_weights(x, batch.local_ids, batch.local_bounds, batch.keys):
            token, start = int(batch.tokens[local]), int(batch.starts[local])
            self.entropy.append(torch.special.entr(weights).sum(-1))
            self.top1.append(weights.max(-1).values)
            self.rows.append(torch.full((len(positions),), weights.shape[1]))
            self.row_max[start:start + weights.shape[1]] = torch.maximum(
                self.row_max[start:start + weights.shape[1]], weights.max(0).values)
            self.counts[token] += len(positions)

    def result(self) -> LayerDiagnostics:
        def cat(parts: list[Tensor]) -> np.ndarray:
            return torch.cat(parts).numpy() if parts else np.zeros(0)

        return LayerDiagnostics(self.block, cat(self.entropy), cat(self.top1), cat(self.rows),
                                self.row_max.numpy(), self.counts.numpy(), self.layer.bounds.cpu().numpy())


class L3Diagnostics:
    """Records every L³ layer of `model` during the forward passes run inside `with`:

        with L3Diagnostics(model) as diagnostics:
            evaluate_lm(model, text, tokenizer, seq_length)
        layers = diagnostics.result()   # {block: LayerDiagnostics}
    """

    def __init__(self, model: DecoderLM) -> None:
        self.recorders = {int(block): _LayerRecorder(int(block), lookup.lookup)
                          for block, lookup in model.lookups.items()}
        self.handles: list = []

    def __enter__(self) -> "L3Diagnostics":
        self.handles = [recorder.layer.register_forward_hook(recorder) for recorder in self.recorders.values()]
        return self

    def __exit__(self, *_: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def result(self) -> dict[int, LayerDiagnostics]:
        return {block: recorder.result() for block, recorder in sorted(self.recorders.items())}
