"""Which shard (rank) owns which token's L³ rows, decided once before training.

Why a plan can be made offline: L³ routing is static (docs/l3_layer.md). A
position with token id t needs exactly the rows `bounds[t]:bounds[t+1]` of W_K/W_V, so the
owner of every row is a function of the token id alone and can be fixed before the first
step, like an embedding table's row sharding and unlike MoE expert placement. Each shard
stores the rows of the tokens it owns and computes the layer's row attention for every
position of the global batch whose token it owns (positions travel to their owner and
back; that exchange is not part of this module).

A token's rows are never split across shards: its softmax runs over all d_t rows, and
splitting would need a cross-shard log-sum-exp merge. Whole tokens keep the existing row
attention (`l3train/model/l3_attention.py`) unchanged on a shard.

Two loads must be balanced, because the slowest shard sets the step time and the fullest
one sets the memory:
- work: a position of token t costs d_t·(d_in + d_emb) multiply-adds and moves d_t rows,
  so a shard's expected work per step is proportional to Σ_{t owned} f_t·d_t, with f_t the
  unigram frequency of t (the allocation file records it for the corpus sample);
- memory: rows stored (parameters, gradients and optimizer state all scale with them),
  Σ_{t owned} d_t.

The naive split into contiguous id ranges of equal row count balances memory only. The
LZW allocation gives frequent tokens the most rows, so w_t = f_t·d_t is far more skewed
than d_t, and BPE ids follow merge order, which correlates with frequency; equal-row
ranges can therefore carry very unequal work. The default plan ("lpt") is greedy
longest-processing-time scheduling on both loads at once. Loads are normalised by their
totals, work_s / W and rows_s / R, and a shard's combined load is the larger of the two.
Tokens are taken by work descending (ties: more rows first, then lower id); each goes to
the shard that keeps the largest combined load over all shards smallest after adding it,
and among the shards that tie on that (the common case once one shard is pinned high by
an unsplittable heavy token), to the one whose loads point least in the token's own
direction, i.e. the smallest (w_t / W)(work_s / W) + (d_t / R)(rows_s / R); then the lowest
shard index. So work-heavy tokens go where work is light and row-heavy ones where rows
are light. (Choosing the shard with the smallest own combined load instead, the textbook
rule, leaves rows 9-17% above the mean at 32 shards on the default corpus, against 2%;
at 16 shards with k=128 it happens to do better, 5% against 9%.)
LPT is within 4/3 of the optimal makespan in one dimension and the gap shrinks with many
small items; the default corpus has thousands of tokens, the heaviest carrying 7-10% of
the work. That also bounds what any plan of whole tokens can do: with more shards than
1 / (largest work share), that token alone exceeds the mean and work max/mean is at
least N·(largest share). The greedy then pins the largest combined load at that bound
and only keeps rows below it (usually well below, by the tie-break): it does not trade
a little more work on the pinned shard for better-balanced rows. Tokens with zero frequency carry no expected work; they are
placed last, by rows alone (to the shard with the fewest rows), where they fill the row
gaps the work-driven pass left. With no frequencies at all the plan balances rows only.
The plan is deterministic: no randomness, explicit tie-breaks.

Local layout: a shard's local table holds the rows of its owned tokens in token-id order,
each token's rows in their global order. So `local_rows_per_token(s)` (d_t for owned
tokens, 0 for the others) is a valid allocation of the local table:
`bounds_from_rows(local_rows_per_token(s))` gives the local bounds (empty ranges for
tokens owned elsewhere) and `full_table[global_row_indices(s)]` is the local table.

The plan is saved with a hash of the allocation it was made for (`state_dict`, `save`),
so a checkpoint can store it and a loader can refuse it for another allocation.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from l3train.allocation.allocation import allocation_hash
from l3train.errors import L3TrainError
from l3train.utils.npz import load_npz, save_npz

FORMAT_NAME = "l3train-shard-plan"
FORMAT_VERSION = 1
METHODS = ("lpt", "contiguous")
_REBUILD_HINT = "rebuild it with tools/shard_plan.py"


def max_over_mean(loads: np.ndarray) -> float:
    """Imbalance of per-shard loads: max / mean (1.0 is perfect; 1.0 also when all are 0)."""
    loads = np.asarray(loads, dtype=np.float64)
    mean = float(loads.mean())
    return float(loads.max()) / mean if mean > 0 else 1.0


class Imbalance(NamedTuple):
    """max / mean over shards of the expected work and of the rows stored."""

    work: float
    rows: float


@dataclass(eq=False)
class ShardPlan:
    """Owner shard of every token; `rows_per_token` is the allocation the plan was made for."""

    owner: np.ndarray  # np.int64[vocab]: shard index of each token
    num_shards: int
    rows_per_token: np.ndarray  # np.int64[vocab]: d_t of the full allocation
    method: str

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise L3TrainError(f"invalid shard plan: {problem}")

    def _problem(self) -> str | None:
        """Normalize the fields' types and say what is inconsistent, or None."""
        if isinstance(self.num_shards, bool) or not isinstance(self.num_shards, (int, np.integer)):
            return f"num_shards must be an integer, got {self.num_shards!r}"
        self.num_shards = int(self.num_shards)
        if self.method not in METHODS:
            return f"unknown method {self.method!r} (expected one of {', '.join(METHODS)})"
        self.owner = np.asarray(self.owner)
        self.rows_per_token = np.asarray(self.rows_per_token)
        for name in ("owner", "rows_per_token"):
            array = getattr(self, name)
            if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
                return f"{name} must be a 1-D integer array, got {array.dtype} of shape {array.shape}"
            setattr(self, name, array.astype(np.int64))
        if len(self.rows_per_token) < 1:
            return "the allocation has no tokens"
        if self.owner.shape != self.rows_per_token.shape:
            return f"owner has shape {self.owner.shape}, rows_per_token {self.rows_per_token.shape}"
        if np.any(self.rows_per_token < 0):
            return "rows per token are negative"
        if not 1 <= self.num_shards <= len(self.owner):
            return f"num_shards={self.num_shards} is outside [1, vocab size {len(self.owner)}]"
        if self.owner.min() < 0 or self.owner.max() >= self.num_shards:
            return f"owners range over [{self.owner.min()}, {self.owner.max()}], outside [0, {self.num_shards})"
        return None

    @property
    def vocab_size(self) -> int:
        return len(self.owner)

    @property
    def allocation_hash(self) -> str:
        return allocation_hash(self.rows_per_token)

    @property
    def ownership_hash(self) -> str:
        """Identity of which shard owns which token (16 hex digits of a sha256): two plans with
        the same per-shard counts but other owners differ here."""
        owner = np.ascontiguousarray(np.asarray(self.owner, dtype="<i8"))
        return hashlib.sha256(owner.tobytes() + str(self.num_shards).encode()).hexdigest()[:16]

    def _check_shard(self, shard: int) -> None:
        if not 0 <= shard < self.num_shards:
            raise L3TrainError(f"shard {shard} is outside [0, {self.num_shards})")

    def local_rows_per_token(self, shard: int) -> np.ndarray:
        """d_t for the tokens `shard` owns, 0 for the others: the local table's allocation."""
        self._check_shard(shard)
        return np.where(self.owner == shard, self.rows_per_token, 0)

    def global_row_indices(self, shard: int) -> np.ndarray:
        """Global row of each local row of `shard` (token-id order): local = full[indices]."""
        self._check_shard(shard)
        bounds = np.concatenate([[0], np.cumsum(self.rows_per_token)])
        owned = np.flatnonzero(self.owner == shard)
        starts, counts = bounds[owned], self.rows_per_token[owned]
        # Row j of token t's block is global row starts[t] + j.
        block_offsets = np.concatenate([[0], np.cumsum(counts)])[:-1]
        return np.repeat(starts - block_offsets, counts) + np.arange(int(counts.sum()))

    def tokens_per_shard(self) -> np.ndarray:
        return np.bincount(self.owner, minlength=self.num_shards).astype(np.int64)

    def rows_per_shard(self) -> np.ndarray:
        """Rows each shard stores: np.int64[num_shards]."""
        return np.bincount(self.owner, weights=self.rows_per_token, minlength=self.num_shards).astype(np.int64)

    def work_per_shard(self, token_frequencies: np.ndarray) -> np.ndarray:
        """Expected work of each shard, Σ_{t owned} f_t·d_t: np.float64[num_shards]."""
        work = self.rows_per_token * _check_frequencies(token_frequencies, self.vocab_size)
        return np.bincount(self.owner, weights=work, minlength=self.num_shards)

    def imbalance(self, token_frequencies: np.ndarray) -> Imbalance:
        """max/mean over shards of expected work and of rows."""
        return Imbalance(work=max_over_mean(self.work_per_shard(token_frequencies)),
                         rows=max_over_mean(self.rows_per_shard()))

    def measured_work(self, token_ids: np.ndarray) -> np.ndarray:
        """Per-shard Σ d_t over the positions of a real batch (any shape of token ids)."""
        ids = np.asarray(token_ids).reshape(-1)
        if not np.issubdtype(ids.dtype, np.integer):
            raise L3TrainError(f"token ids must be integers, got {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise L3TrainError(
                f"token ids range over [{ids.min()}, {ids.max()}], outside the plan's vocabulary "
                f"[0, {self.vocab_size}); the data was tokenized with another tokenizer"
            )
        return np.bincount(self.owner[ids], weights=self.rows_per_token[ids],
                           minlength=self.num_shards).astype(np.int64)

    def state_dict(self) -> dict[str, Any]:
        """Plain arrays and scalars, for a checkpoint; `from_state_dict` reverses it."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "owner": self.owner.copy(),
            "rows_per_token": self.rows_per_token.copy(),
            "num_shards": self.num_shards,
            "method": self.method,
            "allocation_hash": self.allocation_hash,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], expect_rows_per_token: np.ndarray | None = None,
                        expect_num_shards: int | None = None, source: str = "shard plan") -> "ShardPlan":
        """Rebuild and verify a plan: its arrays must match the hash it was saved with, and
        (when given) the model's allocation and shard count. Problems are L3TrainError."""
        if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
            raise L3TrainError(f"{source} is not an l3train shard plan; {_REBUILD_HINT}")
        if state.get("format_version") != FORMAT_VERSION:
            raise L3TrainError(f"{source} has format version {state.get('format_version')}, this l3train "
                               f"reads version {FORMAT_VERSION}; {_REBUILD_HINT}")
        missing = [key for key in ("owner", "rows_per_token", "num_shards", "method", "allocation_hash")
                   if key not in state]
        if missing:
            raise L3TrainError(f"{source} lacks {', '.join(missing)}; {_REBUILD_HINT}")
        try:
            plan = cls(owner=state["owner"], num_shards=state["num_shards"],
                       rows_per_token=state["rows_per_token"], method=state["method"])
        except L3TrainError as err:
            raise L3TrainError(f"{source}: {err}; {_REBUILD_HINT}") from err
        if plan.allocation_hash != state["allocation_hash"]:
            raise L3TrainError(f"{source} is corrupt (its rows hash to {plan.allocation_hash}, it records "
                               f"{state['allocation_hash']}); {_REBUILD_HINT}")
        if expect_rows_per_token is not None:
            expected = np.asarray(expect_rows_per_token)
            if allocation_hash(expected) != plan.allocation_hash:
                raise L3TrainError(
                    f"{source} was made for allocation {plan.allocation_hash} (vocab {plan.vocab_size}, "
                    f"v={int(plan.rows_per_token.sum())}), but the model's allocation is "
                    f"{allocation_hash(expected)} (vocab {len(expected)}, v={int(expected.sum())}); {_REBUILD_HINT}"
                )
        if expect_num_shards is not None and plan.num_shards != expect_num_shards:
            raise L3TrainError(f"{source} has {plan.num_shards} shards, but {expect_num_shards} are expected; "
                               f"{_REBUILD_HINT} --shards {expect_num_shards}")
        return plan

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz atomically (exactly at `path`, no suffix is added)."""
        state = self.state_dict()
        save_npz(path, {key: state.pop(key) for key in ("owner", "rows_per_token")}, state)

    @classmethod
    def load(cls, path: str | os.PathLike, expect_rows_per_token: np.ndarray | None = None,
             expect_num_shards: int | None = None) -> "ShardPlan":
        """Read and verify a plan file; any problem is a one-line L3TrainError."""
        arrays, state = load_npz(path, ("owner", "rows_per_token"), "shard plan file", _REBUILD_HINT)
        state.update(arrays)
        return cls.from_state_dict(state, expect_rows_per_token, expect_num_shards, source=f"shard plan {path}")


def _check_frequencies(token_frequencies: np.ndarray, vocab_size: int) -> np.ndarray:
    frequencies = np.asarray(token_frequencies)
    if frequencies.shape != (vocab_size,) or not np.issubdtype(frequencies.dtype, np.number):
        raise L3TrainError(f"token frequencies must be numbers of shape ({vocab_size},), "
                           f"got {frequencies.dtype} of shape {frequencies.shape}")
    frequencies = frequencies.astype(np.float64)
    if not np.all(np.isfinite(frequencies)) or np.any(frequencies < 0):
        raise L3TrainError("token frequencies must be finite and non-negative")
    return frequencies


def _contiguous_owner(rows: np.ndarray, num_shards: int) -> np.ndarray:
    """Contiguous id ranges of about R/N rows: a token goes to the shard its middle row is in."""
    total = int(rows.sum())
    if total == 0:
        return np.arange(len(rows), dtype=np.int64) * num_shards // len(rows)
    middle_twice = 2 * np.concatenate([[0], np.cumsum(rows)])[:-1] + rows  # integer: exact
    return middle_twice * num_shards // (2 * total)


def _lpt_owner(rows: np.ndarray, work: np.ndarray, num_shards: int) -> np.ndarray:
    """Greedy LPT on (work, rows); see the module docstring for the rule and tie-breaks."""
    vocab_size = len(rows)
    owner = np.empty(vocab_size, dtype=np.int64)
    shard_work = np.zeros(num_shards)
    shard_rows = np.zeros(num_shards)
    # Normalising by the totals makes the two loads comparable; max(·, 1) avoids 0/0 and
    # leaves an all-zero dimension at load 0, so it never decides.
    total_work = max(float(work.sum()), 1.0)
    total_rows = max(float(rows.sum()), 1.0)

    largest = 0.0  # the largest combined load over all shards so far; loads only grow
    busy = np.flatnonzero(work > 0)
    for token in busy[np.lexsort((busy, -rows[busy], -work[busy]))]:
        work_share, rows_share = work[token] / total_work, rows[token] / total_rows
        combined = np.maximum(shard_work / total_work + work_share, shard_rows / total_rows + rows_share)
        makespan = np.maximum(combined, largest)
        tied = np.flatnonzero(makespan == makespan.min())
        alignment = work_share * shard_work[tied] / total_work + rows_share * shard_rows[tied] / total_rows
        shard = int(tied[np.argmin(alignment)])
        owner[token] = shard
        shard_work[shard] += work[token]
        shard_rows[shard] += rows[token]
        largest = max(largest, float(combined[shard]))

    idle = np.flatnonzero(work == 0)
    for token in idle[np.lexsort((idle, -rows[idle]))]:
        shard = int(np.argmin(shard_rows))
        owner[token] = shard
        shard_rows[shard] += rows[token]
    return owner


def plan_shards(rows_per_token: np.ndarray, token_frequencies: np.ndarray | None, num_shards: int,
                method: str = "lpt") -> ShardPlan:
    """Assign every token's rows to one of `num_shards` shards.

    method "lpt": balance expected work f_t·d_t and rows d_t (module docstring);
    "contiguous": equal-row contiguous id ranges, the naive baseline. `token_frequencies`
    None or all zero means unknown: "lpt" then balances rows only.
    """
    if method not in METHODS:
        raise L3TrainError(f"unknown shard plan method {method!r} (expected one of {', '.join(METHODS)})")
    rows = np.asarray(rows_per_token)
    if rows.ndim != 1 or len(rows) < 1 or not np.issubdtype(rows.dtype, np.integer) or np.any(rows < 0):
        raise L3TrainError("rows per token must be a non-empty 1-D array of non-negative integers")
    rows = rows.astype(np.int64)
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) \
            or not 1 <= num_shards <= len(rows):
        raise L3TrainError(f"number of shards must be an integer in [1, vocab size {len(rows)}], got {num_shards!r}")
    if method == "contiguous":
        owner = _contiguous_owner(rows, int(num_shards))
    else:
        frequencies = (np.zeros(len(rows)) if token_frequencies is None
                       else _check_frequencies(token_frequencies, len(rows)))
        owner = _lpt_owner(rows, frequencies * rows, int(num_shards))
    return ShardPlan(owner=owner, num_shards=int(num_shards), rows_per_token=rows, method=method)
