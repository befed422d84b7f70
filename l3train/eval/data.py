"""Evaluation text as token arrays: held-out documents of an indexed dataset, or a raw text/JSONL file.

Every document ends with the EOD token, as in the preprocessed training data, and the
evaluation stream starts with one EOD: each document's first token is then predicted after
an EOD, exactly as it is in training (where the previous document's EOD precedes it), and
every token of every document is scored once.

Held-out documents are those of one part (train, valid or test) of `data.split`, cut by
document exactly as megatron cuts them for training (the part's bounds are the rounded
cumulative fractions of the document count), so `valid` is the same set of documents the
trainer validates on, whatever the seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from l3train.data.sources import iter_documents
from l3train.data.dataset import check_tokenizer_matches, parse_split
from l3train.data.indexed import IndexedDocuments
from l3train.data.tokenizer import Tokenizer
from l3train.errors import L3TrainError

SPLIT_PARTS = ("train", "valid", "test", "all")


@dataclass
class EvalText:
    """Documents to score, each an array of token ids ending with EOD."""

    documents: list[np.ndarray]
    description: str  # where they came from, for reports
    # UTF-8 bytes of the documents as written (None for an indexed dataset, which stores tokens only)
    text_bytes: int | None = None

    @property
    def num_tokens(self) -> int:
        return int(sum(len(doc) for doc in self.documents))


def split_range(num_documents: int, split: str, part: str) -> tuple[int, int]:
    """Documents [begin, end) of `part` of `split` ("98,2,0"); "all" is every document."""
    if part not in SPLIT_PARTS:
        raise L3TrainError(f"split part must be one of {', '.join(SPLIT_PARTS)}, got {part!r}")
    if part == "all":
        return 0, num_documents
    # The same cumulative sums and rounding as megatron's split (and l3train.data.dataset's check of it).
    bounds = np.concatenate([[0.0], np.cumsum(parse_split(split))])
    index = SPLIT_PARTS.index(part)
    return int(round(bounds[index] * num_documents)), int(round(bounds[index + 1] * num_documents))


def limit_documents(documents: list[np.ndarray], max_tokens: int | None) -> list[np.ndarray]:
    """The leading whole documents holding at most `max_tokens` tokens (at least one document):
    whole documents keep the byte count of bits per byte exact."""
    if max_tokens is None:
        return documents
    if max_tokens < 1:
        raise L3TrainError(f"--max-tokens must be positive, got {max_tokens}")
    ends = np.cumsum([len(doc) for doc in documents])
    return documents[:max(1, int(np.searchsorted(ends, max_tokens, side="right")))]


def indexed_documents(prefix: str, tokenizer: Tokenizer, split: str, part: str) -> EvalText:
    """The documents of `part` of `split` of the indexed dataset `prefix`."""
    check_tokenizer_matches(prefix, tokenizer)
    dataset = IndexedDocuments(prefix)
    begin, end = split_range(dataset.num_documents, split, part)
    if begin == end:
        raise L3TrainError(f"the {part} part of split {split!r} of {prefix} ({dataset.num_documents} documents) "
                           f"is empty; choose another --split-part or --split")
    starts = dataset.document_starts
    tokens = dataset.read(starts[begin], starts[end] - starts[begin]).astype(np.int64)
    documents = np.split(tokens, starts[begin + 1:end] - starts[begin])
    return EvalText(documents, f"{prefix} ({part} part of split {split}: {len(documents)} documents)")


def text_documents(path: str | os.PathLike, tokenizer: Tokenizer, fmt: str = "auto", json_key: str = "text",
                   max_tokens: int | None = None) -> EvalText:
    """The documents of a raw text (one per line) or JSONL file, tokenized, each with EOD appended,
    and their UTF-8 bytes as written (the tokenizer normalises: its round trip may differ)."""
    texts = list(iter_documents(path, fmt, json_key))
    documents = [np.asarray([*tokenizer.encode(text), tokenizer.eod_id], dtype=np.int64) for text in texts]
    if not documents:
        raise L3TrainError(f"{path} holds no non-empty document")
    kept = limit_documents(documents, max_tokens)
    cut = f", the first {len(kept)} (--max-tokens {max_tokens})" if len(kept) < len(documents) else ""
    return EvalText(kept, f"{path} ({len(documents)} documents{cut})",
                    sum(len(text.encode("utf-8")) for text in texts[:len(kept)]))


def detokenized_bytes(tokenizer: Tokenizer, documents: list[np.ndarray]) -> int:
    """UTF-8 bytes of the documents' detokenized text (EOD decodes to nothing): bits per byte's
    denominator where the text as written is unknown (an indexed dataset). The tokenizer's
    normalisation (NFKC, collapsed whitespace) can make it shorter than the text was."""
    return sum(len(tokenizer.decode(doc.tolist()).encode("utf-8")) for doc in documents)


def token_stream(documents: list[np.ndarray], eod_id: int) -> np.ndarray:
    """EOD followed by every document: the sequence whose tokens after the first are scored."""
    return np.concatenate([np.asarray([eod_id], dtype=np.int64), *documents])
