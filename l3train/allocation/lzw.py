"""LZW codeword counting (Algorithm 1 steps 1-2; docs/allocation.md).

Two implementations of the same scan:

- `reference_lzw` is the paper's loop restated verbatim (tuple-keyed dict). It is the
  definition of correctness, quirks (a)-(d) included, and is used by tests, by the
  benchmark and by `--mode lzw-reference`. It is far too slow for real corpora: every step
  slices and hashes a tuple as long as the current match.
- `LZWScanner` produces exactly the same codewords, counts and insertion order from a trie
  in a small C helper (`_lzw.c`). Node ids 0..V-1 are the single tokens in id order, later
  ids are n-grams in insertion order, which is the reference dict's order, so ties in the
  allocation sort break identically.

The C helper is compiled on first use with the system C compiler into a cache directory
(`$L3TRAIN_CACHE`, default `~/.cache/l3train`; l3train.utils.c_library).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from l3train.errors import L3TrainError
from l3train.utils.c_library import load_c_library

_SOURCE = Path(__file__).with_name("_lzw.c")
_COMPILE_FLAGS = ("-O2", "-shared", "-fPIC", "-std=c99")


# An LZW dictionary grows sublinearly with the text scanned; on real text a scan makes about
# 0.3 trie nodes per token (the stdlib docstrings: 0.33 at 0.5M tokens, fewer per token on
# larger samples), so this bound overestimates the nodes of larger scans, never underestimates.
NODES_PER_TOKEN = 0.35


def predicted_scan_bytes(tokens: int, vocab_size: int) -> int:
    """Peak memory of the C trie after scanning `tokens` tokens (at most NODES_PER_TOKEN nodes each,
    plus one per vocabulary entry): per node 20 bytes (parent 8, last token 4, count 8) in arrays
    that double, so up to twice the nodes and, while one is reallocated, both; and a power-of-two
    hash table of 17-byte slots (16 + a tag byte) filled to at most 3/4, which is doubled by
    rehashing with both tables alive."""
    nodes = int(tokens * NODES_PER_TOKEN) + vocab_size
    capacity = 1 << max(nodes - 1, 1).bit_length()  # the node arrays after their last doubling
    slots = 1 << max(int(nodes * 4 / 3), 1).bit_length()
    return int(20 * capacity * 1.5 + 17 * slots * 1.5)

def reference_lzw(
    documents: Iterable[Sequence[int]],
    vocab_size: int,
    counts: dict[tuple[int, ...], int] | None = None,
) -> dict[tuple[int, ...], int]:
    """The paper's LZW counting loop, verbatim; returns `{codeword tuple: count}`.

    The dict's insertion order is part of the result (it breaks ties in the allocation
    sort). Pass the returned dict back as `counts` to continue the scan over more
    documents. Token ids are not validated: this is the paper's code, not an input path.
    """
    if counts is None:
        counts = {(s,): 0 for s in range(vocab_size)}
    for toks in documents:
        last, cur = 0, 1
        while cur < len(toks):
            while cur < len(toks) and tuple(toks[last:cur]) in counts:
                cur += 1
            if cur > last + 1:
                counts[tuple(toks[last : cur - 1])] += 1
                counts[tuple(toks[last:cur])] = 1
            last = cur
            cur += 1
    return counts


@dataclass(eq=False)
class LZWCodewords:
    """The LZW dictionary as parallel arrays, one entry per codeword in insertion order.

    `parent[i]` is the index of codeword i without its last token (-1 for single tokens),
    so codeword i is `codeword(parent[i]) + (last_token[i],)`.
    """

    counts: np.ndarray
    last_token: np.ndarray
    parent: np.ndarray

    def __len__(self) -> int:
        return len(self.counts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LZWCodewords) and all(
            np.array_equal(mine, theirs)
            for mine, theirs in (
                (self.counts, other.counts),
                (self.last_token, other.last_token),
                (self.parent, other.parent),
            )
        )

    def to_dict(self) -> dict[tuple[int, ...], int]:
        """Rebuild the reference's `{tuple: count}` dict (insertion order included)."""
        words: list[tuple[int, ...]] = []
        for parent, token in zip(self.parent.tolist(), self.last_token.tolist()):
            words.append((words[parent] if parent >= 0 else ()) + (token,))
        return dict(zip(words, self.counts.tolist()))

    @classmethod
    def from_dict(cls, counts: dict[tuple[int, ...], int]) -> "LZWCodewords":
        """Arrays for a reference dict; every proper prefix of a key must be a key."""
        index = {word: i for i, word in enumerate(counts)}
        return cls(
            counts=np.fromiter(counts.values(), dtype=np.int64, count=len(counts)),
            last_token=np.fromiter((w[-1] for w in counts), dtype=np.int64, count=len(counts)),
            parent=np.fromiter(
                (index[w[:-1]] if len(w) > 1 else -1 for w in counts),
                dtype=np.int64,
                count=len(counts),
            ),
        )


@functools.lru_cache(maxsize=None)
def _load_library() -> ctypes.CDLL:
    """`_lzw.c` compiled once per source version, loaded, and its functions typed (once)."""
    library = load_c_library(_SOURCE, _COMPILE_FLAGS, "the fast LZW scanner",
                             ", or use --mode lzw-reference (pure Python, very slow)")
    int64_array = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
    int32_array = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
    library.lzw_create.restype = ctypes.c_void_p
    library.lzw_create.argtypes = [ctypes.c_int64]
    library.lzw_free.restype = None
    library.lzw_free.argtypes = [ctypes.c_void_p]
    library.lzw_scan.restype = ctypes.c_int
    library.lzw_scan.argtypes = [ctypes.c_void_p, int32_array, int64_array, ctypes.c_int64]
    library.lzw_count_tokens.restype = ctypes.c_int64
    library.lzw_count_tokens.argtypes = [int32_array, ctypes.c_int64, ctypes.c_int64, int64_array]
    library.lzw_num_nodes.restype = ctypes.c_int64
    library.lzw_num_nodes.argtypes = [ctypes.c_void_p]
    library.lzw_export.restype = None
    library.lzw_export.argtypes = [ctypes.c_void_p, int64_array, int64_array, int64_array]
    return library


class LZWScanner:
    """Streaming LZW scan with the reference's exact output, in C.

    Feed batches of documents with `add_documents`; the dictionary persists across calls,
    exactly as the reference's dict does across documents. Results are read back as
    arrays in insertion order (`codewords()`, or `counts`/`last_token`/`parent`).
    """

    def __init__(self, vocab_size: int) -> None:
        if not 1 <= vocab_size < 2**31:
            raise L3TrainError(f"vocab size must be in [1, 2**31), got {vocab_size}")
        self._lib = _load_library()
        self.vocab_size = int(vocab_size)
        self._trie = self._lib.lzw_create(self.vocab_size)
        if not self._trie:
            raise MemoryError("cannot allocate the LZW dictionary")
        self.token_frequencies = np.zeros(self.vocab_size, dtype=np.int64)
        self.tokens_scanned = 0
        self.documents_scanned = 0

    def add_documents(self, tokens: np.ndarray, doc_offsets: np.ndarray) -> None:
        """Scan documents `tokens[doc_offsets[d]:doc_offsets[d+1]]`, d = 0..len(doc_offsets)-2.

        `doc_offsets` starts at 0, never decreases and ends at `len(tokens)`.
        """
        trie = self._open_trie()
        tokens = np.asarray(tokens)
        doc_offsets = np.ascontiguousarray(doc_offsets, dtype=np.int64)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise L3TrainError(f"tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
        if (
            doc_offsets.ndim != 1
            or len(doc_offsets) < 1
            or doc_offsets[0] != 0
            or doc_offsets[-1] != len(tokens)
            or np.any(np.diff(doc_offsets) < 0)
        ):
            raise L3TrainError(
                "doc_offsets must start at 0, never decrease and end at len(tokens) "
                f"= {len(tokens)}"
            )
        if not np.can_cast(tokens.dtype, np.int32) and len(tokens):
            # Ids that do not fit int32 would wrap in the cast and look valid.
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.vocab_size:
                self._raise_bad_token(tokens, low if low < 0 else high)
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        frequencies = np.zeros(self.vocab_size, dtype=np.int64)
        bad_position = self._lib.lzw_count_tokens(tokens, len(tokens), self.vocab_size, frequencies)
        if bad_position >= 0:
            self._raise_bad_token(tokens, int(tokens[bad_position]))
        status = self._lib.lzw_scan(trie, tokens, doc_offsets, len(doc_offsets) - 1)
        if status:
            # The dictionary now holds part of this batch: unusable, so free it.
            self.close()
            reason = "out of memory" if status == -1 else "more than 2**32 codewords"
            raise L3TrainError(
                f"the LZW dictionary grew too large ({reason}); scan fewer tokens (--max-tokens)"
            )
        self.token_frequencies += frequencies
        self.tokens_scanned += len(tokens)
        self.documents_scanned += len(doc_offsets) - 1

    def _raise_bad_token(self, tokens: np.ndarray, bad_id: int) -> None:
        position = int(np.flatnonzero(tokens == bad_id)[0])
        raise L3TrainError(
            f"token id {bad_id} at position {position} of this batch is outside the "
            f"vocabulary [0, {self.vocab_size}); is the vocab size right?"
        )

    def _open_trie(self) -> int:
        if self._trie is None:
            raise ValueError("this LZWScanner was closed")
        return self._trie

    @property
    def num_codewords(self) -> int:
        return int(self._lib.lzw_num_nodes(self._open_trie()))

    def codewords(self) -> LZWCodewords:
        """A copy of the dictionary, in insertion order."""
        n = self.num_codewords
        words = LZWCodewords(
            counts=np.empty(n, dtype=np.int64),
            last_token=np.empty(n, dtype=np.int64),
            parent=np.empty(n, dtype=np.int64),
        )
        self._lib.lzw_export(self._open_trie(), words.counts, words.parent, words.last_token)
        return words

    @property
    def counts(self) -> np.ndarray:
        return self.codewords().counts

    @property
    def last_token(self) -> np.ndarray:
        return self.codewords().last_token

    @property
    def parent(self) -> np.ndarray:
        return self.codewords().parent

    def close(self) -> None:
        """Free the C dictionary (also done on garbage collection)."""
        if getattr(self, "_trie", None):
            self._lib.lzw_free(self._trie)
        self._trie = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "LZWScanner":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _documents_as_lists(
    tokens_or_documents: np.ndarray | Sequence[Sequence[int]], doc_offsets: np.ndarray | None
) -> list[list[int]]:
    if doc_offsets is None:
        return [list(map(int, doc)) for doc in tokens_or_documents]
    tokens = np.asarray(tokens_or_documents)
    bounds = np.asarray(doc_offsets).tolist()
    return [tokens[start:end].tolist() for start, end in zip(bounds[:-1], bounds[1:])]


def reference_lzw_counts(
    tokens_or_documents: np.ndarray | Sequence[Sequence[int]],
    vocab_size: int,
    doc_offsets: np.ndarray | None = None,
) -> LZWCodewords:
    """`reference_lzw` over documents given as a list of token sequences, or as a flat
    `tokens` array plus `doc_offsets` (as `LZWScanner.add_documents` takes them).

    Documents are converted to Python lists first, as the paper's script gets them from
    the tokenizer, so timing it measures the paper's loop and not numpy slicing.
    """
    documents = _documents_as_lists(tokens_or_documents, doc_offsets)
    return LZWCodewords.from_dict(reference_lzw(documents, vocab_size))


def fast_lzw_counts(
    tokens_or_documents: np.ndarray | Sequence[Sequence[int]],
    vocab_size: int,
    doc_offsets: np.ndarray | None = None,
) -> LZWCodewords:
    """Same inputs and output as `reference_lzw_counts`, computed by `LZWScanner`."""
    if doc_offsets is None:
        documents = [np.asarray(doc, dtype=np.int64).reshape(-1) for doc in tokens_or_documents]
        lengths = [len(doc) for doc in documents]
        doc_offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        tokens = np.concatenate(documents) if documents else np.zeros(0, dtype=np.int64)
    else:
        tokens = np.asarray(tokens_or_documents)
    with LZWScanner(vocab_size) as scanner:
        scanner.add_documents(tokens, doc_offsets)
        return scanner.codewords()
