"""The project's tokenizer: a thin wrapper around a trained sentencepiece model.

Everything downstream (preprocessed data, checkpoints, the L3 allocation) is only valid
for the exact tokenizer it was made with, so a tokenizer is identified by a hash of its
`.model` file (`tokenizer_id`) rather than by its path. The sentencepiece `eos` piece
serves as the end-of-document (EOD) token appended after every document.

Models are produced by `tools/train_tokenizer.py` (`train_tokenizer` below): byte
fallback on (no unknown tokens, any UTF-8 round-trips), NFKC normalization without the
NMT rule that turns newlines into spaces (so paragraph breaks survive), digits split.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from l3train.errors import L3TrainError
from l3train.utils.atomic import atomic_path, atomic_write_text

_HOW_TO_MAKE = (
    "train one with: python tools/train_tokenizer.py --input data/corpus/stdlib_docstrings.jsonl "
    "--output-prefix data/tokenizer"
)


class Tokenizer:
    """A loaded sentencepiece model plus the identity of the file it came from."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path, model_bytes: bytes):
        self._sp = processor
        self.path = path
        self.tokenizer_id = hashlib.sha256(model_bytes).hexdigest()[:16]
        self.vocab_size: int = processor.get_piece_size()
        self.eod_id: int = processor.eos_id()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a `.model` file; a missing or unreadable one raises `L3TrainError`."""
        path = Path(path)
        if not path.is_file():
            raise L3TrainError(f"tokenizer model not found: {path}; {_HOW_TO_MAKE}")
        model_bytes = path.read_bytes()
        processor = spm.SentencePieceProcessor()
        try:
            # Loading from the bytes we hash guarantees tokenizer_id matches the model used.
            processor.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError, TypeError):
            raise L3TrainError(
                f"tokenizer model {path} is corrupt or not a sentencepiece model; {_HOW_TO_MAKE}"
            ) from None
        if processor.eos_id() < 0:
            raise L3TrainError(
                f"tokenizer model {path} has no eos piece, which l3train uses as the "
                f"end-of-document token; {_HOW_TO_MAKE}"
            )
        return cls(processor, path, model_bytes)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no EOD appended)."""
        return self._sp.encode(text, out_type=int)

    def encode_prompt(self, text: str) -> list[int]:
        """EOD, then the token ids of `text`: how a prompt (the start of a document) is read by a
        model trained on documents that each follow an EOD (the previous document's, or the
        stream's first). Generation and evaluation start every prompt this way."""
        return [self.eod_id, *self.encode(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special pieces such as EOD decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return (
            f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, "
            f"tokenizer_id={self.tokenizer_id!r})"
        )


def train_tokenizer(
    sentences: Iterator[str],
    output_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    num_threads: int = 1,
    max_sentences: int = 0,
    seed: int = 0,
    verbose: bool = False,
) -> Tokenizer:
    """Train a sentencepiece model and write `<prefix>.model` and `<prefix>.vocab` atomically.

    Deterministic for the same sentences and arguments: the sampling seed is fixed and
    the model is returned in memory (no temporary path gets recorded inside it). Unigram
    training results depend on `num_threads`, so keep it fixed to reproduce a model.
    `max_sentences` > 0 trains on a seeded random sample of that many sentences.
    """
    if model_type not in ("bpe", "unigram"):
        raise L3TrainError(f"model type must be bpe or unigram, got {model_type!r}")
    if vocab_size < 260:
        # 256 byte-fallback pieces + unk/bos/eos must fit.
        raise L3TrainError(f"--vocab-size must be at least 260 (byte fallback), got {vocab_size}")
    spm.set_random_generator_seed(seed)
    model_bytes = _train_model_bytes(
        sentences, vocab_size, model_type, num_threads, max_sentences, verbose
    )
    return _write_model(model_bytes, Path(output_prefix))


def _train_model_bytes(
    sentences: Iterator[str],
    vocab_size: int,
    model_type: str,
    num_threads: int,
    max_sentences: int,
    verbose: bool,
) -> bytes:
    """Run the sentencepiece trainer; its failures become `L3TrainError`s."""
    model = io.BytesIO()
    input_errors: list[L3TrainError] = []

    def checked(sentences: Iterator[str]) -> Iterator[str]:
        # sentencepiece turns exceptions raised by the iterator into an opaque
        # RuntimeError; keep ours (e.g. "file:line: invalid JSON") to re-raise as is.
        try:
            yield from sentences
        except L3TrainError as err:
            input_errors.append(err)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=checked(sentences),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            # nmt_nfkc would map "\n" to a space; plain NFKC keeps paragraph breaks.
            normalization_rule_name="nfkc",
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=num_threads,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            # Docstring paragraphs can be long; sentencepiece silently drops longer lines.
            max_sentence_length=16384,
            minloglevel=0 if verbose else 1,
        )
    except RuntimeError as err:
        if input_errors:
            raise input_errors[0] from None
        # e.g. "Vocabulary size too high (8000). Please set it to a value <= 1234."
        message = str(err).split("] ")[-1].strip()
        raise L3TrainError(f"sentencepiece training failed: {message}") from None
    return model.getvalue()


def _write_model(model_bytes: bytes, prefix: Path) -> Tokenizer:
    """Write `<prefix>.vocab` and `<prefix>.model` atomically; return the loaded model."""
    model_path = prefix.with_name(prefix.name + ".model")
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(model_bytes)
    vocab = "".join(
        f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
        for i in range(processor.get_piece_size())
    )
    atomic_write_text(prefix.with_name(prefix.name + ".vocab"), vocab)
    with atomic_path(model_path) as tmp:
        tmp.write_bytes(model_bytes)
    return Tokenizer(processor, model_path, model_bytes)


def iter_training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """Split documents into the per-line sentences sentencepiece trains on.

    Sentencepiece treats every input string as one sentence and learns no piece across
    a newline, so each paragraph is fed separately; empty lines carry nothing.
    """
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                yield line

