"""Build an allocation from a corpus sample: stream its documents, scan them, allocate rows.

This is Algorithm 1 end to end (docs/allocation.md): the corpus is read once, in batches
of whole documents, so memory holds one batch plus the LZW dictionary; what the scan
collects depends on the mode (LZW codewords for lzw/lzw-reference, unigram frequencies
for all). `build_allocation` is the whole pipeline in one call; tools/lzw_allocate.py
runs its steps (`open_corpus`, `scan_and_allocate`) to print what the scan saw.

A corpus source is one of:
- an indexed-dataset prefix (`<prefix>.bin/.idx`): each document is one LZW document,
  minus the EOD token preprocessing appended (the paper's documents have no EOD);
- a `TextFile`: UTF-8 text, one document per line, tokenized on the fly;
- token sequences in memory, one per document;
- None: no corpus, which only the uniform mode can do without.

The tokenizer identity (id and vocabulary size) may come from a tokenizer model, from
explicit values, or from the dataset's `<prefix>.meta.json`; all that are given must agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, Union

import numpy as np
from tqdm import tqdm

from l3train.allocation.allocation import MODES, Allocation, check_budget
from l3train.allocation.allocation import frequency_allocation, lzw_allocation, uniform_allocation
from l3train.allocation.lzw import NODES_PER_TOKEN, LZWCodewords, LZWScanner, predicted_scan_bytes, reference_lzw
from l3train.data.indexed import IndexedDocuments, data_meta_path, read_meta
from l3train.data.tokenizer import Tokenizer
from l3train.errors import L3TrainError

# Tokens per scanned batch: bounds memory and amortizes per-call overhead.
BATCH_TOKENS = 1 << 22

Batch = tuple[np.ndarray, np.ndarray]  # (tokens, doc_offsets), as LZWScanner takes them


@dataclass(frozen=True)
class TextFile:
    """A UTF-8 text file with one document per line (the paper script's input)."""

    path: str | os.PathLike


@dataclass(frozen=True)
class CorpusOptions:
    """Whose tokens a corpus holds and how much of it to read; all optional.

    `tokenizer` is a sentencepiece .model: it tokenizes a `TextFile` and identifies the
    tokenizer; `tokenizer_id` and `vocab_size` identify it without the model (with a
    dataset they default to its meta's). `eod_id` (datasets only, default: the meta's) is
    stripped where it ends a document. `max_tokens` cuts the scan there; `description` is
    recorded in the allocation (default: derived from the source).
    """

    tokenizer: str | os.PathLike | None = None
    tokenizer_id: str | None = None
    vocab_size: int | None = None
    eod_id: int | None = None
    max_tokens: int | None = None
    description: str | None = None


CorpusSource = Union[str, os.PathLike, TextFile, Iterable[Sequence[int]], None]


@dataclass
class Corpus:
    """Where tokens come from and the tokenizer identity they carry."""

    vocab_size: int
    tokenizer_id: str
    description: str
    batches: Iterator[Batch] | None  # None: no corpus (uniform mode)
    total_tokens: int | None  # for the progress bar, when known up front
    tokenizer: Tokenizer | None  # for printing pieces, when available
    tokens_at_most: int | None = None  # a bound when the count is not known (a text file's bytes)


def _resolve_identity(options: CorpusOptions, meta: dict, meta_source: str) -> tuple[Tokenizer | None, str, int]:
    """The tokenizer (if given), its id and the vocab size; every source must agree."""
    tokenizer = Tokenizer.load(options.tokenizer) if options.tokenizer else None
    ids = {
        "--tokenizer": tokenizer.tokenizer_id if tokenizer else None,
        "--tokenizer-id": options.tokenizer_id,
        meta_source: meta.get("tokenizer_id"),
    }
    sizes = {
        "--tokenizer": tokenizer.vocab_size if tokenizer else None,
        "--vocab-size": options.vocab_size,
        meta_source: meta.get("vocab_size"),
    }
    for what, values in (("tokenizer id", ids), ("vocab size", sizes)):
        known = {source: value for source, value in values.items() if value is not None}
        if len(set(known.values())) > 1:
            raise L3TrainError(f"conflicting {what}s: " + ", ".join(f"{v} from {s}" for s, v in known.items()))
    resolved_id = next((value for value in ids.values() if value), None)
    resolved_size = next((value for value in sizes.values() if value is not None), None)
    if resolved_id is None:
        raise L3TrainError(
            "no tokenizer identity: pass --tokenizer MODEL (or --tokenizer-id ID); the "
            "allocation is only valid for the tokenizer it was built with"
        )
    if resolved_size is None:
        raise L3TrainError("unknown vocab size: pass --vocab-size or --tokenizer MODEL")
    return tokenizer, str(resolved_id), int(resolved_size)


def _strip_eod(tokens: np.ndarray, offsets: np.ndarray, eod_id: int) -> Batch:
    """Drop the last token of every document that ends with `eod_id`."""
    lengths = np.diff(offsets)
    ends_with_eod = np.zeros(len(lengths), dtype=bool)
    nonempty = lengths > 0
    ends_with_eod[nonempty] = tokens[offsets[1:][nonempty] - 1] == eod_id
    keep = np.ones(len(tokens), dtype=bool)
    keep[offsets[1:][ends_with_eod] - 1] = False
    new_offsets = np.concatenate([[0], np.cumsum(lengths - ends_with_eod)])
    return tokens[keep], new_offsets


def dataset_batches(
    prefix: str, eod_id: int | None, batch_tokens: int = BATCH_TOKENS
) -> tuple[Iterator[Batch], int]:
    """Batches of whole documents from an indexed dataset (EOD stripped when `eod_id` is
    given), and its token count before stripping."""
    documents = IndexedDocuments(prefix)
    batches = documents.batches(batch_tokens)
    if eod_id is not None:
        batches = (_strip_eod(tokens, offsets, eod_id) for tokens, offsets in batches)
    return batches, documents.num_tokens


def _pack(documents: list[Sequence[int]]) -> Batch:
    lengths = np.fromiter((len(doc) for doc in documents), dtype=np.int64, count=len(documents))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    # int64: ids too large for int32 must reach the scanner's range check, not wrap.
    tokens = np.concatenate([np.asarray(doc, dtype=np.int64).reshape(-1) for doc in documents])
    return tokens, offsets


def document_batches(documents: Iterable[Sequence[int]], batch_tokens: int = BATCH_TOKENS) -> Iterator[Batch]:
    """Token sequences (one per document) packed into batches of at least `batch_tokens`."""
    pending: list[Sequence[int]] = []
    pending_tokens = 0
    for document in documents:
        pending.append(document)
        pending_tokens += len(document)
        if pending_tokens >= batch_tokens:
            yield _pack(pending)
            pending, pending_tokens = [], 0
    if pending:
        yield _pack(pending)


def _tokenized_lines(path: str | os.PathLike, tokenizer: Tokenizer) -> Iterator[list[int]]:
    """Each line's token ids (newline stripped); read errors name the file and line."""
    line_number = 0
    try:
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                yield tokenizer.encode(line.rstrip("\r\n"))
    except UnicodeDecodeError as err:
        raise L3TrainError(f"{path}:{line_number + 1}: not UTF-8 text ({err.reason})") from err
    except OSError as err:
        raise L3TrainError(f"cannot read --text {path}: {err.strerror or err}") from err


def text_batches(path: str | os.PathLike, tokenizer: Tokenizer, batch_tokens: int = BATCH_TOKENS) -> Iterator[Batch]:
    """Batches of lines (one document each, newline stripped), tokenized one by one."""
    return document_batches(_tokenized_lines(path, tokenizer), batch_tokens)


def limit_tokens(batches: Iterator[Batch], max_tokens: int) -> Iterator[Batch]:
    """Stop after `max_tokens` tokens, cutting the document that crosses the limit."""
    remaining = max_tokens
    for tokens, offsets in batches:
        if len(tokens) > remaining:
            inside = int(np.searchsorted(offsets, remaining, side="left"))
            tokens, offsets = tokens[:remaining], np.append(offsets[:inside], remaining)
        yield tokens, offsets
        remaining -= len(tokens)
        if remaining == 0:
            return


def _dataset_eod_id(prefix: str, eod_id: int | None, meta: dict, vocab_size: int) -> int | None:
    """The EOD id to strip: the given one, else the meta's; they must agree."""
    if eod_id is not None and meta.get("eod_id") not in (None, eod_id):
        raise L3TrainError(f"--eod-id {eod_id} disagrees with eod_id {meta['eod_id']} recorded in "
                           f"{prefix}.meta.json; drop --eod-id")
    eod_id = eod_id if eod_id is not None else meta.get("eod_id")
    if eod_id is not None and not 0 <= eod_id < vocab_size:
        raise L3TrainError(f"--eod-id {eod_id} is outside the vocabulary [0, {vocab_size})")
    return eod_id


def _source_batches(
    source: CorpusSource, tokenizer: Tokenizer | None, eod_id: int | None, meta: dict, vocab_size: int
) -> tuple[Iterator[Batch] | None, int | None, str]:
    """(batches, token count if known, description) of a corpus source."""
    if source is None:
        return None, None, "none (uniform allocation)"
    if isinstance(source, (str, os.PathLike)):
        prefix = str(source)
        eod_id = _dataset_eod_id(prefix, eod_id, meta, vocab_size)
        batches, total = dataset_batches(prefix, eod_id)
        return batches, total, prefix + (f" (EOD {eod_id} stripped)" if eod_id is not None else "")
    if eod_id is not None:
        raise L3TrainError("--eod-id only applies to --data-prefix (text lines carry no EOD)")
    if isinstance(source, TextFile):
        if not os.path.isfile(source.path):
            raise L3TrainError(f"--text {source.path} does not exist")
        if tokenizer is None:
            raise L3TrainError("--text needs --tokenizer MODEL to tokenize it")
        return text_batches(source.path, tokenizer), None, f"{source.path} (one document per line)"
    return document_batches(source), None, "token sequences (one document each)"


def open_corpus(source: CorpusSource, budget_v: int, cap_k: int, options: CorpusOptions = CorpusOptions()) -> Corpus:
    """Resolve the tokenizer identity and open `source` for one streaming pass.

    The budget is checked against the vocabulary here, before anything is read, so a bad
    v fails before a long scan.
    """
    is_dataset = isinstance(source, (str, os.PathLike))
    meta = read_meta(source) if is_dataset else {}
    meta_source = str(data_meta_path(source)) if is_dataset else "dataset meta"
    tokenizer, tokenizer_id, vocab_size = _resolve_identity(options, meta, meta_source)
    check_budget(vocab_size, budget_v, cap_k)
    batches, total, derived = _source_batches(source, tokenizer, options.eod_id, meta, vocab_size)
    max_tokens = options.max_tokens
    if batches is not None and max_tokens is not None:
        batches = limit_tokens(batches, max_tokens)
        total = min(total, max_tokens) if total is not None else max_tokens
        derived += f", first {max_tokens} tokens"
    bound = total if total is not None or not isinstance(source, TextFile) else os.path.getsize(source.path)
    if bound is not None and max_tokens is not None:
        bound = min(bound, max_tokens)
    return Corpus(vocab_size, tokenizer_id, options.description or derived, batches, total, tokenizer, bound)


def check_scan_memory(corpus: Corpus, max_memory: int) -> None:
    """Refuse, before reading anything, an LZW scan whose dictionary would outgrow `max_memory`
    bytes (l3train.allocation.lzw.predicted_scan_bytes; a bound when the token count is not known)."""
    tokens = corpus.tokens_at_most
    if tokens is None or predicted_scan_bytes(tokens, corpus.vocab_size) <= max_memory:
        return
    fits = tokens
    while fits > 1 and predicted_scan_bytes(fits, corpus.vocab_size) > max_memory:
        fits //= 2
    raise L3TrainError(f"an LZW scan of {tokens:,} tokens would need about "
                       f"{predicted_scan_bytes(tokens, corpus.vocab_size) / 1e9:.1f} GB for its dictionary (up to "
                       f"{NODES_PER_TOKEN} trie nodes per token), more than --max-memory {max_memory / 1e9:.1f} GB; "
                       f"scan a sample with --max-tokens (about {fits:,} fit; tools/lzw_convergence.py shows how "
                       f"large a sample the allocation needs) or raise --max-memory")


def _check_token_ids(tokens: np.ndarray, vocab_size: int) -> None:
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
        raise L3TrainError(f"token id {bad} is outside the vocabulary [0, {vocab_size}); wrong --vocab-size?")


@dataclass
class ScanResult:
    """What one pass over the corpus collected."""

    codewords: LZWCodewords | None  # None for modes that only need frequencies
    token_frequencies: np.ndarray
    tokens: int
    documents: int


def scan(corpus: Corpus, mode: str, progress: bool = True) -> ScanResult:
    """Stream the corpus once, collecting what `mode` needs.

    `progress` shows a bar on stderr when it is a terminal (not in batch jobs or logs).
    """
    if mode not in MODES:
        raise L3TrainError(f"unknown allocation mode {mode!r} (expected one of {', '.join(MODES)})")
    frequencies = np.zeros(corpus.vocab_size, dtype=np.int64)
    if corpus.batches is None:
        if mode != "uniform":
            raise L3TrainError(f"--mode {mode} needs a corpus: pass --data-prefix or --text")
        return ScanResult(None, frequencies, 0, 0)
    scanner = LZWScanner(corpus.vocab_size) if mode == "lzw" else None
    reference_counts: dict[tuple[int, ...], int] | None = None
    tokens_seen = documents_seen = 0
    with tqdm(total=corpus.total_tokens, unit="tok", unit_scale=True, disable=None if progress else True,
              desc=mode) as bar:
        for tokens, offsets in corpus.batches:
            if scanner is not None:
                scanner.add_documents(tokens, offsets)
            else:
                _check_token_ids(tokens, corpus.vocab_size)
                frequencies += np.bincount(tokens, minlength=corpus.vocab_size)
                if mode == "lzw-reference":
                    bounds = offsets.tolist()
                    documents = [tokens[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
                    reference_counts = reference_lzw(documents, corpus.vocab_size, reference_counts)
            tokens_seen += len(tokens)
            documents_seen += len(offsets) - 1
            bar.update(len(tokens))
        bar.total = bar.n  # the up-front total counted stripped EODs and cut documents
    if scanner is not None:
        with scanner:
            return ScanResult(scanner.codewords(), scanner.token_frequencies, tokens_seen, documents_seen)
    if mode == "lzw-reference":
        if reference_counts is None:  # empty corpus: the dictionary is the single tokens
            reference_counts = reference_lzw([], corpus.vocab_size)
        return ScanResult(LZWCodewords.from_dict(reference_counts), frequencies, tokens_seen, documents_seen)
    return ScanResult(None, frequencies, tokens_seen, documents_seen)


def allocate_rows(result: ScanResult, mode: str, vocab_size: int, budget_v: int, cap_k: int) -> np.ndarray:
    """Rows per token d_t under `mode` from what the scan collected."""
    if mode in ("lzw", "lzw-reference"):
        return lzw_allocation(result.codewords.counts, result.codewords.last_token, vocab_size, budget_v, cap_k)
    if mode == "frequency":
        return frequency_allocation(result.token_frequencies, budget_v, cap_k)
    return uniform_allocation(vocab_size, budget_v, cap_k)


def scan_and_allocate(
    corpus: Corpus, mode: str, budget_v: int, cap_k: int, progress: bool = True
) -> tuple[Allocation, ScanResult]:
    """The allocation of an opened corpus, and what its scan saw."""
    result = scan(corpus, mode, progress)
    allocation = Allocation(
        rows_per_token=allocate_rows(result, mode, corpus.vocab_size, budget_v, cap_k),
        token_frequencies=result.token_frequencies,
        vocab_size=corpus.vocab_size,
        budget_v=budget_v,
        cap_k=cap_k,
        mode=mode,
        tokenizer_id=corpus.tokenizer_id,
        corpus=corpus.description,
        tokens_scanned=result.tokens,
    )
    return allocation, result


def build_allocation(
    source: CorpusSource, mode: str, budget_v: int, cap_k: int, options: CorpusOptions = CorpusOptions(),
    progress: bool = False,
) -> Allocation:
    """The `mode` allocation of v = `budget_v` rows, at most k = `cap_k` per token, from
    `source` (see the module docstring), e.g.
    `build_allocation(TextFile("corpus.txt"), "lzw", 710000, 512, CorpusOptions(tokenizer="spm.model"))`."""
    corpus = open_corpus(source, budget_v, cap_k, options)
    return scan_and_allocate(corpus, mode, budget_v, cap_k, progress)[0]


def summary_lines(allocation: Allocation, result: ScanResult, tokenizer: Tokenizer | None) -> list[str]:
    """What an allocation looks like: its source, the scan, d_t statistics and the top tokens
    (shown as pieces when the tokenizer is at hand)."""
    rows = allocation.rows_per_token
    lines = [
        f"  mode {allocation.mode}, tokenizer {allocation.tokenizer_id}, vocab {allocation.vocab_size}",
        f"  corpus: {allocation.corpus}",
        f"  scanned {result.tokens:,} tokens in {result.documents:,} documents",
    ]
    if result.codewords is not None:
        lines.append(f"  LZW codewords: {len(result.codewords):,}")
    lines += [
        f"  rows v = {allocation.budget_v:,}, cap k = {allocation.cap_k}, tokens at the cap: "
        f"{int((rows == allocation.cap_k).sum()):,}",
        f"  d_t: mean {rows.mean():.2f}, median {np.median(rows):.0f}, max {rows.max()}",
        f"  mean d_t over token occurrences: {allocation.mean_rows_per_token_occurrence():.2f}",
        "  top 10 tokens by rows:",
    ]
    for token in np.argsort(-rows, kind="stable")[:10]:
        piece = f" {tokenizer.decode([token])!r}" if tokenizer is not None else ""
        lines.append(
            f"    {int(token):>7}{piece}: {rows[token]} rows, {allocation.token_frequencies[token]:,} occurrences"
        )
    return lines
