#!/usr/bin/env python
"""Build the per-token row allocation of the L³ tables (Algorithm 1) from a corpus sample.

The allocation d_t (1 <= d_t <= k, sum = v) decides how many rows of W_K/W_V each token
owns; it is computed once, offline, and becomes part of the model: training and
inference load the .npz written here and refuse one built for another tokenizer.

Modes: lzw is Algorithm 1 (LZW codeword counts, sorted, one row per codeword to its last
token); lzw-reference runs the paper's own Python loop (identical output, much slower);
uniform and frequency are ablations. If the codewords run out before v, the walk repeats
the sorted list (see l3train/allocation/allocation.py).

Examples:

    # from preprocessed training data (tokenizer id, vocab size and EOD id are read
    # from <prefix>.meta.json when it exists)
    python tools/lzw_allocate.py --data-prefix data/indexed/stdlib_docstrings_text_document -v 710000 \\
        --max-tokens 50000000 --output data/allocation.npz

    # from raw text, one document per line, as in the paper's script
    python tools/lzw_allocate.py --text corpus.txt --tokenizer data/tokenizer.model \\
        -v 710000 -k 512 --output data/allocation.npz

Documents are streamed in batches, so memory holds one batch plus the LZW dictionary.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from l3train.allocation import (
    MODES,
    Allocation,
    LZWCodewords,
    LZWScanner,
    check_budget,
    frequency_allocation,
    lzw_allocation,
    reference_lzw,
    uniform_allocation,
)
from l3train.data.indexed import data_meta_path
from l3train.data.tokenizer import Tokenizer
from l3train.errors import CliArgumentParser, L3TrainError, run_cli

# Tokens per scanned batch: bounds memory and amortizes per-call overhead.
BATCH_TOKENS = 1 << 22

Batch = tuple[np.ndarray, np.ndarray]  # (tokens, doc_offsets), as LZWScanner takes them


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--data-prefix",
        metavar="PREFIX",
        help="Megatron indexed dataset <PREFIX>.bin/.idx; each document is one LZW document",
    )
    source.add_argument(
        "--text",
        metavar="FILE",
        help="UTF-8 text, one document per line (needs --tokenizer)",
    )
    identity = parser.add_mutually_exclusive_group()
    identity.add_argument(
        "--tokenizer",
        metavar="MODEL",
        help="sentencepiece .model: tokenizes --text; identifies the tokenizer (sha256)",
    )
    identity.add_argument(
        "--tokenizer-id",
        metavar="ID",
        help="tokenizer id to record when the .model file is not at hand (with --data-prefix "
        "or --mode uniform); default for --data-prefix: from <PREFIX>.meta.json",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        metavar="N",
        help="vocabulary size; default: from --tokenizer or <PREFIX>.meta.json",
    )
    parser.add_argument("--mode", choices=MODES, default="lzw", help="allocation rule (default lzw)")
    parser.add_argument("--budget", "-v", type=int, required=True, metavar="V", help="total rows v (>= vocab size)")
    parser.add_argument("--cap", "-k", type=int, default=512, metavar="K", help="max rows per token k (default 512)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="scan at most this many tokens (the document crossing the limit is cut there)",
    )
    parser.add_argument(
        "--eod-id",
        type=int,
        metavar="ID",
        help="with --data-prefix: drop this token when it ends a document (the paper's "
        "documents have no EOD); default: eod_id from <PREFIX>.meta.json if present",
    )
    parser.add_argument("--corpus", metavar="TEXT", help="free-text corpus description to record (default: derived)")
    parser.add_argument("--output", required=True, metavar="FILE.npz", help="allocation file to write")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.data_prefix is None and args.text is None and args.mode != "uniform":
        parser.error(f"--mode {args.mode} needs a corpus: pass --data-prefix or --text")
    if args.text is not None and args.tokenizer is None:
        parser.error("--text needs --tokenizer MODEL to tokenize it")
    if args.text is not None and args.eod_id is not None:
        parser.error("--eod-id only applies to --data-prefix (text lines carry no EOD)")
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error(f"--max-tokens must be positive, got {args.max_tokens}")
    if Path(args.output).is_dir():
        parser.error(f"--output {args.output} is a directory; give a file name")
    return args


@dataclass
class Corpus:
    """Where tokens come from and the tokenizer identity they carry."""

    vocab_size: int
    tokenizer_id: str
    description: str
    batches: Iterator[Batch] | None  # None: no corpus (uniform mode)
    total_tokens: int | None  # for the progress bar, when known up front
    tokenizer: Tokenizer | None  # for printing pieces, when available


def _read_meta(prefix: str) -> dict:
    path = data_meta_path(prefix)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise L3TrainError(f"{path} is unreadable ({err}); recreate it with tools/preprocess_data.py") from err


def _resolve_identity(args: argparse.Namespace, meta: dict) -> tuple[Tokenizer | None, str, int]:
    """The tokenizer (if given), its id and the vocab size; every source must agree."""
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    meta_source = str(data_meta_path(args.data_prefix)) if args.data_prefix else "dataset meta"
    ids = {
        "--tokenizer": tokenizer.tokenizer_id if tokenizer else None,
        "--tokenizer-id": args.tokenizer_id,
        meta_source: meta.get("tokenizer_id"),
    }
    sizes = {
        "--tokenizer": tokenizer.vocab_size if tokenizer else None,
        "--vocab-size": args.vocab_size,
        meta_source: meta.get("vocab_size"),
    }
    for what, values in (("tokenizer id", ids), ("vocab size", sizes)):
        known = {source: value for source, value in values.items() if value is not None}
        if len(set(known.values())) > 1:
            raise L3TrainError(f"conflicting {what}s: " + ", ".join(f"{v} from {s}" for s, v in known.items()))
    tokenizer_id = next((value for value in ids.values() if value), None)
    vocab_size = next((value for value in sizes.values() if value is not None), None)
    if tokenizer_id is None:
        raise L3TrainError(
            "no tokenizer identity: pass --tokenizer MODEL (or --tokenizer-id ID); the "
            "allocation is only valid for the tokenizer it was built with"
        )
    if vocab_size is None:
        raise L3TrainError("unknown vocab size: pass --vocab-size or --tokenizer MODEL")
    return tokenizer, str(tokenizer_id), int(vocab_size)


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


def dataset_batches(prefix: str, eod_id: int | None) -> tuple[Iterator[Batch], int]:
    """Batches of whole documents from a Megatron indexed dataset, and its token count."""
    from l3train.data.dataset import check_indexed_dataset

    itemsize, _ = check_indexed_dataset(prefix)
    with warnings.catch_warnings():
        # megatron-core warns at import that Apex/Transformer Engine are absent.
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    dataset = IndexedDataset(prefix)
    sequence_starts = np.concatenate([[0], np.cumsum(dataset.sequence_lengths, dtype=np.int64)])
    # A document is a run of sequences; its tokens are contiguous in the .bin file.
    doc_starts = sequence_starts[np.asarray(dataset.document_indices)]
    num_docs = len(doc_starts) - 1

    def batches() -> Iterator[Batch]:
        first = 0
        while first < num_docs:
            end = int(np.searchsorted(doc_starts, doc_starts[first] + BATCH_TOKENS, side="right")) - 1
            end = min(max(end, first + 1), num_docs)
            tokens = dataset.bin_reader.read(
                dtype=dataset.index.dtype,
                count=int(doc_starts[end] - doc_starts[first]),
                offset=int(doc_starts[first]) * itemsize,
            )
            offsets = doc_starts[first : end + 1] - doc_starts[first]
            yield _strip_eod(tokens, offsets, eod_id) if eod_id is not None else (tokens, offsets)
            first = end

    return batches(), int(doc_starts[-1])


def text_batches(path: str, tokenizer: Tokenizer) -> Iterator[Batch]:
    """Batches of lines (one document each, newline stripped), tokenized one by one."""
    documents: list[list[int]] = []
    batch_tokens = 0
    line_number = 0
    try:
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                ids = tokenizer.encode(line.rstrip("\r\n"))
                documents.append(ids)
                batch_tokens += len(ids)
                if batch_tokens >= BATCH_TOKENS:
                    yield _pack(documents)
                    documents, batch_tokens = [], 0
    except UnicodeDecodeError as err:
        raise L3TrainError(f"{path}:{line_number + 1}: not UTF-8 text ({err.reason})") from err
    except OSError as err:
        raise L3TrainError(f"cannot read --text {path}: {err.strerror or err}") from err
    if documents:
        yield _pack(documents)


def _pack(documents: list[list[int]]) -> Batch:
    lengths = np.fromiter((len(doc) for doc in documents), dtype=np.int64, count=len(documents))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.fromiter((t for doc in documents for t in doc), dtype=np.int32, count=int(offsets[-1]))
    return tokens, offsets


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


def open_corpus(args: argparse.Namespace) -> Corpus:
    meta: dict = {}
    if args.data_prefix is not None:
        meta = _read_meta(args.data_prefix)
    tokenizer, tokenizer_id, vocab_size = _resolve_identity(args, meta)
    check_budget(vocab_size, args.budget, args.cap)  # fail before a long scan
    batches: Iterator[Batch] | None = None
    total: int | None = None
    if args.data_prefix is not None:
        eod_id = args.eod_id if args.eod_id is not None else meta.get("eod_id")
        if args.eod_id is not None and meta.get("eod_id") not in (None, args.eod_id):
            raise L3TrainError(f"--eod-id {args.eod_id} disagrees with eod_id {meta['eod_id']} recorded in "
                               f"{args.data_prefix}.meta.json; drop --eod-id")
        if eod_id is not None and not 0 <= eod_id < vocab_size:
            raise L3TrainError(f"--eod-id {eod_id} is outside the vocabulary [0, {vocab_size})")
        batches, total = dataset_batches(args.data_prefix, eod_id)
        description = f"{args.data_prefix}" + (f" (EOD {eod_id} stripped)" if eod_id is not None else "")
    elif args.text is not None:
        if not Path(args.text).is_file():
            raise L3TrainError(f"--text {args.text} does not exist")
        batches = text_batches(args.text, tokenizer)
        description = f"{args.text} (one document per line)"
    else:
        description = "none (uniform allocation)"
    if batches is not None and args.max_tokens is not None:
        batches = limit_tokens(batches, args.max_tokens)
        total = min(total, args.max_tokens) if total is not None else args.max_tokens
        description += f", first {args.max_tokens} tokens"
    return Corpus(vocab_size, tokenizer_id, args.corpus or description, batches, total, tokenizer)


def _check_token_ids(tokens: np.ndarray, vocab_size: int) -> None:
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
        raise L3TrainError(f"token id {bad} is outside the vocabulary [0, {vocab_size}); wrong --vocab-size?")


@dataclass
class ScanResult:
    codewords: LZWCodewords | None  # None for modes that only need frequencies
    token_frequencies: np.ndarray
    tokens: int
    documents: int


def scan(corpus: Corpus, mode: str, quiet: bool) -> ScanResult:
    """Stream the corpus once, collecting what `mode` needs."""
    frequencies = np.zeros(corpus.vocab_size, dtype=np.int64)
    if corpus.batches is None:
        return ScanResult(None, frequencies, 0, 0)
    scanner = LZWScanner(corpus.vocab_size) if mode == "lzw" else None
    reference_counts: dict[tuple[int, ...], int] | None = None
    tokens_seen = documents_seen = 0
    # disable=None: no bar when stderr is not a terminal (batch jobs, logs).
    with tqdm(total=corpus.total_tokens, unit="tok", unit_scale=True, disable=True if quiet else None, desc=mode) as bar:
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


def allocate(args: argparse.Namespace, corpus: Corpus, result: ScanResult) -> np.ndarray:
    if args.mode in ("lzw", "lzw-reference"):
        return lzw_allocation(
            result.codewords.counts, result.codewords.last_token, corpus.vocab_size, args.budget, args.cap
        )
    if args.mode == "frequency":
        return frequency_allocation(result.token_frequencies, args.budget, args.cap)
    return uniform_allocation(corpus.vocab_size, args.budget, args.cap)


def print_summary(allocation: Allocation, result: ScanResult, corpus: Corpus, seconds: float, output: str) -> None:
    rows = allocation.rows_per_token
    lines = [
        f"wrote {output}",
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
        piece = f" {corpus.tokenizer.decode([token])!r}" if corpus.tokenizer is not None else ""
        lines.append(
            f"    {int(token):>7}{piece}: {rows[token]} rows, {allocation.token_frequencies[token]:,} occurrences"
        )
    lines.append(f"  time: {seconds:.1f} s")
    print("\n".join(lines))


def main() -> None:
    start = time.monotonic()
    args = parse_args()
    corpus = open_corpus(args)
    result = scan(corpus, args.mode, args.quiet)
    allocation = Allocation(
        rows_per_token=allocate(args, corpus, result),
        token_frequencies=result.token_frequencies,
        vocab_size=corpus.vocab_size,
        budget_v=args.budget,
        cap_k=args.cap,
        mode=args.mode,
        tokenizer_id=corpus.tokenizer_id,
        corpus=corpus.description,
        tokens_scanned=result.tokens,
    )
    try:
        allocation.save(args.output)
    except OSError as err:
        raise L3TrainError(f"cannot write --output {args.output}: {err.strerror or err}") from err
    print_summary(allocation, result, corpus, time.monotonic() - start, args.output)


if __name__ == "__main__":
    run_cli(main)
