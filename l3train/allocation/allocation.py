"""Per-token row allocation d_t for the L³ tables, and its on-disk artifact.

Token t owns rows `bounds[t]:bounds[t+1]` of W_K/W_V (docs/l3_layer.md), so the
allocation is part of the model: a checkpoint is meaningless without the exact allocation
and tokenizer it was trained with. `Allocation.load` therefore validates everything and
refuses a file built for another vocabulary or tokenizer.

Modes:
- "lzw" / "lzw-reference": Algorithm 1 steps 3-4 (`lzw_allocation`, docs/allocation.md)
  over the LZW codewords (scanned by the fast C scanner or by the paper's Python loop).
- "uniform": every token gets v/V rows (the ablation the paper shows loses the gain).
- "frequency": rows proportional to unigram frequency (an ablation between the two).

Quirk (e) -- codewords run out before the budget v is reached. The paper's code simply
fails. Here the walk continues over the same sorted codeword list again, pass after pass,
still giving one row per codeword to its last token and still respecting the cap k,
until the total reaches v. Every token is a codeword (its single-token entry), so every
token can reach k and any v <= V*k is reachable; each extra pass keeps the LZW ranking's
shape (tokens ending many codewords gain the most per pass) instead of switching to an
unrelated rule. A budget above V*k is impossible under the cap and is refused.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from l3train.errors import L3TrainError
from l3train.utils.npz import load_npz, save_npz

FORMAT_NAME = "l3train-allocation"
FORMAT_VERSION = 1
MODES = ("lzw", "lzw-reference", "uniform", "frequency")
_REBUILD_HINT = "rebuild it with tools/lzw_allocate.py"


def allocation_hash(rows_per_token: np.ndarray) -> str:
    """Identity of an allocation d_t: the first 16 hex digits of the sha256 of its int64 rows."""
    rows = np.ascontiguousarray(np.asarray(rows_per_token, dtype="<i8"))
    return hashlib.sha256(rows.tobytes()).hexdigest()[:16]


def check_budget(vocab_size: int, budget_v: int, cap_k: int) -> None:
    """Refuse budgets no allocation can meet: each token has 1 <= d_t <= k and Σ d_t = v."""
    if vocab_size < 1:
        raise L3TrainError(f"vocab size must be at least 1, got {vocab_size}")
    if cap_k < 1:
        raise L3TrainError(f"cap k must be at least 1 row per token, got k={cap_k}")
    if budget_v < vocab_size:
        raise L3TrainError(
            f"budget v={budget_v} is smaller than the vocab size {vocab_size}: every token "
            "needs at least one row; use v >= vocab size"
        )
    if budget_v > vocab_size * cap_k:
        raise L3TrainError(
            f"budget v={budget_v} exceeds vocab size x cap = {vocab_size} x {cap_k} = "
            f"{vocab_size * cap_k}: no token may have more than k rows; raise k or lower v"
        )


def _rank_within_token(sorted_last_token: np.ndarray, vocab_size: int) -> np.ndarray:
    """For each codeword in sorted order, how many earlier ones end in the same token."""
    by_token = np.argsort(sorted_last_token, kind="stable")
    group_start = np.concatenate([[0], np.cumsum(np.bincount(sorted_last_token, minlength=vocab_size))])
    rank = np.empty(len(sorted_last_token), dtype=np.int64)
    rank[by_token] = np.arange(len(by_token)) - group_start[sorted_last_token[by_token]]
    return rank


def lzw_allocation(
    counts: np.ndarray, last_token: np.ndarray, vocab_size: int, budget_v: int, cap_k: int
) -> np.ndarray:
    """Algorithm 1 steps 3-4: rows per token from LZW codeword counts.

    `counts[i]`, `last_token[i]` describe codeword i in dictionary insertion order. The
    codewords are sorted by count, descending, ties in insertion order; d_t starts at 1;
    the walk gives one row to each codeword's last token unless it is at the cap k, and
    stops when Σ d_t = v. If the list runs out first, the walk repeats it (quirk (e),
    see the module docstring). Returns d_t as np.int64[vocab_size].

    Vectorized: within one pass, a codeword is granted a row iff fewer than k-1 rows went
    to its token before it, i.e. iff (rows from earlier passes) + (its rank among the
    codewords ending in the same token) < k-1; grants happen in (pass, sorted position)
    order, so the budget is the first v-V of them.
    """
    check_budget(vocab_size, budget_v, cap_k)
    counts = np.asarray(counts, dtype=np.int64)
    last_token = np.asarray(last_token, dtype=np.int64)
    if counts.shape != last_token.shape or counts.ndim != 1:
        raise ValueError("counts and last_token must be 1-D arrays of the same length")
    if len(last_token) and (last_token.min() < 0 or last_token.max() >= vocab_size):
        raise ValueError(f"last_token ids must be in [0, {vocab_size})")
    rows = np.ones(vocab_size, dtype=np.int64)
    extra = budget_v - vocab_size
    if extra == 0:
        return rows
    # No token can exceed 1 + extra rows, so a larger k (e.g. "infinite") changes nothing;
    # clamping it keeps `passes * codewords_per_token` below overflow.
    cap = min(cap_k, extra + 1)

    # Stable sort of -count == descending count with ties in insertion order (quirk d).
    sorted_last = last_token[np.argsort(-counts, kind="stable")]
    rank = _rank_within_token(sorted_last, vocab_size)
    codewords_per_token = np.bincount(last_token, minlength=vocab_size)
    grantable = np.where(codewords_per_token > 0, cap - 1, 0)
    if grantable.sum() < extra:
        raise L3TrainError(
            f"budget v={budget_v} cannot be reached: only {int((codewords_per_token > 0).sum())} "
            f"tokens end a codeword, and each can grow to at most k={cap_k} rows"
        )

    def granted_after(passes: int) -> np.ndarray:
        return np.minimum(grantable, passes * codewords_per_token)

    # The pass in which the running total reaches v: the smallest p with
    # Σ_t granted_after(p + 1) >= extra (monotone in p, so bisect).
    low, high = 0, cap - 1
    while low < high:
        middle = (low + high) // 2
        if granted_after(middle + 1).sum() >= extra:
            high = middle
        else:
            low = middle + 1
    final_pass = low
    rows += granted_after(final_pass)
    remaining = extra - int(granted_after(final_pass).sum())
    granted_in_final_pass = final_pass * codewords_per_token[sorted_last] + rank < cap - 1
    rows += np.bincount(sorted_last[granted_in_final_pass][:remaining], minlength=vocab_size)
    return rows


def uniform_allocation(vocab_size: int, budget_v: int, cap_k: int) -> np.ndarray:
    """v/V rows per token; the v mod V leftover rows go to the lowest token ids."""
    check_budget(vocab_size, budget_v, cap_k)
    rows = np.full(vocab_size, budget_v // vocab_size, dtype=np.int64)
    rows[: budget_v % vocab_size] += 1
    return rows


def frequency_allocation(token_frequencies: np.ndarray, budget_v: int, cap_k: int) -> np.ndarray:
    """Rows proportional to unigram frequency: d_t = clip(s * f_t, 1, k), Σ d_t = v.

    The scale s is found by bisection (Σ clip(s f_t, 1, k) is continuous and monotone in
    s), then rounded by largest remainder (ties to the lower token id) so the total is
    exactly v. Rounding never leaves [1, k]: only tokens with a fractional share, hence
    below k, are rounded up, and their fractions add up to at least the rows missing.
    """
    frequencies = np.asarray(token_frequencies, dtype=np.float64)
    vocab_size = len(frequencies)
    check_budget(vocab_size, budget_v, cap_k)
    if np.any(frequencies < 0):
        raise L3TrainError("token frequencies must be non-negative")
    seen = int((frequencies > 0).sum())
    reachable = vocab_size + seen * (cap_k - 1)
    if budget_v > reachable:
        raise L3TrainError(
            f"budget v={budget_v} cannot be reached by a frequency allocation: only {seen} "
            f"tokens occur in the corpus and each can have at most k={cap_k} rows "
            f"(max {reachable}); scan more text or use a smaller v"
        )

    def total_rows(scale: float) -> float:
        return float(np.clip(scale * frequencies, 1, cap_k).sum())

    low, high = 0.0, cap_k / frequencies[frequencies > 0].min() if seen else 0.0
    for _ in range(200):
        middle = (low + high) / 2
        if total_rows(middle) < budget_v:
            low = middle
        else:
            high = middle
    # `high` always satisfies Σ ideal >= v, so flooring leaves rows missing, never extra.
    ideal = np.clip(high * frequencies, 1, cap_k)
    rows = np.floor(ideal).astype(np.int64)
    fraction = ideal - rows
    missing = budget_v - int(rows.sum())
    by_remainder = np.lexsort((np.arange(vocab_size), -fraction))
    rows[by_remainder[:missing]] += 1
    return rows


@dataclass(eq=False)
class Allocation:
    """Rows per token plus what is needed to check it belongs to a model and tokenizer."""

    rows_per_token: np.ndarray
    token_frequencies: np.ndarray
    vocab_size: int
    budget_v: int
    cap_k: int
    mode: str
    tokenizer_id: str
    corpus: str
    tokens_scanned: int

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise L3TrainError(f"invalid allocation: {problem}")

    def _problem(self) -> str | None:
        """Normalize the fields' types and say what is inconsistent, or None."""
        for name in ("vocab_size", "budget_v", "cap_k", "tokens_scanned"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                return f"{name} must be an integer, got {value!r}"
            setattr(self, name, int(value))
        for name in ("mode", "tokenizer_id", "corpus"):
            if not isinstance(getattr(self, name), str):
                return f"{name} must be a string, got {getattr(self, name)!r}"
        self.rows_per_token = np.asarray(self.rows_per_token)
        self.token_frequencies = np.asarray(self.token_frequencies)
        for name in ("rows_per_token", "token_frequencies"):
            if not np.issubdtype(getattr(self, name).dtype, np.integer):
                return f"{name} must hold integers, got {getattr(self, name).dtype}"
            setattr(self, name, getattr(self, name).astype(np.int64))
        if self.vocab_size < 1:
            return f"vocab size {self.vocab_size} is below 1"
        if self.mode not in MODES:
            return f"unknown mode {self.mode!r} (expected one of {', '.join(MODES)})"
        if not self.tokenizer_id:
            return "it names no tokenizer"
        if self.rows_per_token.shape != (self.vocab_size,):
            return f"rows_per_token has shape {self.rows_per_token.shape}, expected ({self.vocab_size},)"
        if self.token_frequencies.shape != (self.vocab_size,):
            return f"token_frequencies has shape {self.token_frequencies.shape}, expected ({self.vocab_size},)"
        if np.any(self.token_frequencies < 0):
            return "token frequencies are negative"
        if self.cap_k < 1:
            return f"cap k={self.cap_k} is below 1"
        total = int(self.rows_per_token.sum())
        if total != self.budget_v:
            return f"rows sum to {total}, not the budget v={self.budget_v}"
        low, high = int(self.rows_per_token.min()), int(self.rows_per_token.max())
        if low < 1 or high > self.cap_k:
            return f"rows per token range over [{low}, {high}], outside [1, k={self.cap_k}]"
        return None

    def mean_rows_per_token_occurrence(self) -> float:
        """Σ f_t d_t / Σ f_t: the mean d_t a corpus token sees (plain mean of d_t when the
        frequencies are unknown). This, not max d_t = k, sets the layer's average cost."""
        total = int(self.token_frequencies.sum())
        if total == 0:
            return float(self.rows_per_token.mean())
        return float((self.token_frequencies * self.rows_per_token).sum() / total)

    def metadata(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "vocab_size": int(self.vocab_size),
            "budget_v": int(self.budget_v),
            "cap_k": int(self.cap_k),
            "mode": self.mode,
            "tokenizer_id": self.tokenizer_id,
            "corpus": self.corpus,
            "tokens_scanned": int(self.tokens_scanned),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz atomically (exactly at `path`, no suffix is added)."""
        save_npz(path, {"rows_per_token": self.rows_per_token, "token_frequencies": self.token_frequencies},
                 self.metadata())

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        expect_vocab_size: int | None = None,
        expect_tokenizer_id: str | None = None,
    ) -> "Allocation":
        """Read and validate an allocation file; any problem is one-line L3TrainError."""
        arrays, metadata = load_npz(path, ("rows_per_token", "token_frequencies"), "allocation file",
                                    _REBUILD_HINT)
        rows, frequencies = arrays["rows_per_token"], arrays["token_frequencies"]
        not_allocation = f"{path} is not an l3train allocation file or is corrupt"
        if metadata.get("format") != FORMAT_NAME:
            raise L3TrainError(f"{not_allocation} (no allocation metadata); {_REBUILD_HINT}")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise L3TrainError(
                f"allocation {path} has format version {metadata.get('format_version')}, this "
                f"l3train reads version {FORMAT_VERSION}; {_REBUILD_HINT}"
            )
        missing = [field for field in _METADATA_FIELDS if field not in metadata]
        if missing:
            raise L3TrainError(f"{not_allocation} (metadata lacks {', '.join(missing)}); {_REBUILD_HINT}")
        try:
            allocation = cls(
                rows_per_token=rows,
                token_frequencies=frequencies,
                **{field: metadata[field] for field in _METADATA_FIELDS},
            )
        except L3TrainError as err:
            raise L3TrainError(f"{path}: {err}; {_REBUILD_HINT}") from err
        if expect_vocab_size is not None and allocation.vocab_size != expect_vocab_size:
            raise L3TrainError(
                f"allocation {path} is for a vocabulary of {allocation.vocab_size} tokens, but "
                f"the config's vocab size is {expect_vocab_size}; {_REBUILD_HINT}"
            )
        if expect_tokenizer_id is not None and allocation.tokenizer_id != expect_tokenizer_id:
            raise L3TrainError(
                f"allocation {path} was built for tokenizer {allocation.tokenizer_id}, but the "
                f"config uses tokenizer {expect_tokenizer_id}; {_REBUILD_HINT} --tokenizer "
                "<the config's tokenizer model>"
            )
        return allocation


_METADATA_FIELDS = ("vocab_size", "budget_v", "cap_k", "mode", "tokenizer_id", "corpus", "tokens_scanned")
