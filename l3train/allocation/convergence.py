"""How large a sample the LZW allocation needs: allocations from growing samples of one corpus.

A scan of a whole pretraining corpus would hold a dictionary of hundreds of GB
(l3train.allocation.lzw.predicted_scan_bytes), so the allocation comes from a sample
(`--max-tokens`). This module says from the data when a sample is large enough: one
streaming pass over the corpus takes a snapshot of the LZW dictionary each time the tokens
scanned double (from `start_tokens`), turns each snapshot into an allocation (Algorithm 1,
the same v and k) and reports how much each changes from the one before: rows moved
(½ Σ_t |d_t − d'_t|, the rows that now belong to another token) as a count and a share of
v, and the share of v moved against the largest sample. Snapshots are taken at document
boundaries, so each is exactly the allocation of a sample ending there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from l3train.allocation.allocation import lzw_allocation
from l3train.allocation.build import Corpus
from l3train.allocation.lzw import LZWScanner
from l3train.errors import L3TrainError


@dataclass(frozen=True)
class Snapshot:
    tokens: int  # scanned
    codewords: int
    rows_per_token: np.ndarray


def snapshots(corpus: Corpus, budget_v: int, cap_k: int, start_tokens: int) -> Iterator[Snapshot]:
    """The allocation after about start_tokens, 2·start_tokens, ... tokens (at the first document
    boundary from each: the scan is never cut, so each snapshot is exactly the allocation of a
    sample ending there, and the last is the whole corpus's)."""
    if corpus.batches is None:
        raise L3TrainError("the convergence of an allocation needs a corpus: pass --data-prefix or --text")
    if start_tokens < 1:
        raise L3TrainError(f"--start must be positive, got {start_tokens}")
    with LZWScanner(corpus.vocab_size) as scanner:
        scanned, next_point, last = 0, start_tokens, None

        def feed(tokens: np.ndarray, offsets: np.ndarray, first: int, end: int) -> int:
            scanner.add_documents(tokens[offsets[first]:offsets[end]], offsets[first:end + 1] - offsets[first])
            return int(offsets[end] - offsets[first])

        def snapshot() -> Snapshot:
            words = scanner.codewords()
            rows = lzw_allocation(words.counts, words.last_token, corpus.vocab_size, budget_v, cap_k)
            return Snapshot(scanned, scanner.num_codewords, rows)

        for tokens, offsets in corpus.batches:
            first = 0
            while (end := int(np.searchsorted(offsets, next_point - scanned + offsets[first]))) < len(offsets):
                scanned += feed(tokens, offsets, first, end)
                first, last = end, snapshot()
                yield last
                while next_point <= scanned:
                    next_point *= 2
            scanned += feed(tokens, offsets, first, len(offsets) - 1)
        if scanned and (last is None or last.tokens != scanned):
            yield snapshot()  # the whole corpus, past the last doubling


def convergence_table(corpus: Corpus, budget_v: int, cap_k: int, start_tokens: int,
                      log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Log and return one row per snapshot: tokens, codewords, rows moved against the previous
    snapshot and against the largest (the last)."""
    taken = list(snapshots(corpus, budget_v, cap_k, start_tokens))
    last = taken[-1].rows_per_token
    rows = []
    log(f"{'tokens':>13} {'codewords':>11} {'rows moved vs previous':>24} {'share of v':>10} {'vs largest':>10}")
    for index, snap in enumerate(taken):
        moved = int(np.abs(snap.rows_per_token - taken[index - 1].rows_per_token).sum() // 2) if index else None
        to_last = float(np.abs(snap.rows_per_token - last).sum() / 2 / budget_v)
        rows.append({"tokens": snap.tokens, "codewords": snap.codewords, "rows_moved": moved,
                     "share_moved": None if moved is None else moved / budget_v, "share_vs_largest": to_last})
        log(f"{snap.tokens:>13,} {snap.codewords:>11,} {'' if moved is None else f'{moved:,}':>24} "
            f"{'' if moved is None else f'{moved / budget_v:.2%}':>10} {to_last:>10.2%}")
    return rows
