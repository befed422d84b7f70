"""Preprocessing: tokenize a text/JSONL corpus into a Megatron indexed dataset (.bin/.idx).

The output is written with megatron-core's own `IndexedDatasetBuilder`, so the files are
exactly what `GPTDataset` (and Megatron-LM's tooling) reads; each document is followed
by the EOD token. Token dtype is uint16 below 65500 vocabulary entries, else int32
(megatron's `DType.optimal_dtype` rule).

Tokenizing a large corpus takes hours, so the work is resumable: the input is cut into
fixed chunks of lines (one line = one document), each chunk is written as a partial
dataset under `<output_prefix>.parts/` and marked done only once complete. A rerun with
the same input, tokenizer and settings skips finished chunks (a manifest detects any
change, which discards the parts). Finally the parts are concatenated in order with
`builder.add_index` into a temporary prefix and renamed into place, so the final
`.bin`/`.idx` never exist half-written. Chunks and ordered `Pool.imap` make the output
byte-identical for any worker count and any chunk size.

Reading back: `read_meta` is the one reader of the `<prefix>.meta.json` sidecar, and
`IndexedDocuments` the one way tools and analyses open a dataset outside training (as
whole documents, or as windows of its token stream). Training reads through megatron's
`GPTDataset` instead (l3train/data/dataset.py).

megatron-core is imported lazily: importing it costs several seconds, which `--help`,
argument errors and the Pool workers (which only tokenize) should not pay.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import multiprocessing
import os
import shutil
import struct
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from l3train.data.corpus import check_input, detect_format, parse_document
from l3train.data.tokenizer import Tokenizer
from l3train.errors import L3TrainError
from l3train.utils.atomic import atomic_write_text

DEFAULT_CHUNK_LINES = 50_000  # a chunk's lines are held in memory while tokenized
# Lines per Pool task: large enough to amortize inter-process overhead, small enough
# that both workers stay busy on small chunks.
_IMAP_CHUNKSIZE = 64
_MANIFEST_VERSION = 1
# Tokens per read when iterating over a dataset's documents: bounds memory, amortizes calls.
READ_TOKENS = 1 << 22


@dataclass
class PreprocessStats:
    """What `preprocess` produced; also recorded in `<prefix>.meta.json`."""

    documents: int
    tokens: int
    chunks: int
    chunks_reused: int
    dtype: str
    seconds: float


def token_dtype(vocab_size: int) -> type[np.integer]:
    """uint16 while every id fits with megatron's margin (vocab < 65500), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, #sequences, #documents
# Megatron's dtype codes → bytes per token.
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}
HOW_TO_FIX = "recreate it with tools/preprocess_data.py --output-prefix {prefix}"


def check_indexed_dataset(prefix: str) -> tuple[int, np.ndarray]:
    """Validate `<prefix>.idx/.bin`; return (token item size, per-document token counts).

    Catches what otherwise surfaces as an assertion or a segfault deep inside megatron:
    missing files, a file that is no Megatron index, truncation, and an .idx that does
    not describe its .bin.
    """
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise L3TrainError(
                f"dataset file missing: {path}; {HOW_TO_FIX.format(prefix=prefix)}"
            )

    def corrupt(why: str) -> L3TrainError:
        return L3TrainError(
            f"dataset index {idx_path} is corrupt ({why}); {HOW_TO_FIX.format(prefix=prefix)}"
        )

    idx_size = idx_path.stat().st_size
    with open(idx_path, "rb") as handle:
        header = handle.read(_INDEX_HEADER_BYTES)
    if len(header) < _INDEX_HEADER_BYTES:
        raise corrupt(f"only {idx_size} bytes")
    if header[:9] != _INDEX_MAGIC:
        raise corrupt("wrong magic bytes: not a Megatron .idx file")
    version, code, n_sequences, n_documents = struct.unpack("<QBQQ", header[9:])
    if version != 1 or code not in _DTYPE_SIZES:
        raise corrupt(f"unsupported version {version} or dtype code {code}")
    expected = _INDEX_HEADER_BYTES + n_sequences * (4 + 8) + n_documents * 8
    if idx_size != expected:
        raise corrupt(f"{idx_size} bytes where its header implies {expected}: truncated?")
    index = np.memmap(idx_path, mode="r", offset=_INDEX_HEADER_BYTES)
    lengths = np.frombuffer(index, dtype=np.int32, count=n_sequences)
    doc_bounds = np.frombuffer(index, dtype=np.int64, count=n_documents, offset=n_sequences * 12)
    bounds_ok = n_documents >= 2 and doc_bounds[0] == 0 and doc_bounds[-1] == n_sequences
    if not bounds_ok or np.any(np.diff(doc_bounds) < 0):
        raise corrupt("inconsistent document boundaries or no documents")
    itemsize = _DTYPE_SIZES[code]
    bin_expected = int(lengths.sum(dtype=np.int64)) * itemsize
    bin_size = bin_path.stat().st_size
    if bin_size != bin_expected:
        raise L3TrainError(
            f"dataset {bin_path} has {bin_size} bytes but {idx_path} describes {bin_expected}: "
            f"the pair is truncated or mismatched; {HOW_TO_FIX.format(prefix=prefix)}"
        )
    return itemsize, np.array(lengths)


def data_meta_path(prefix: str | os.PathLike) -> Path:
    """Sidecar recording the tokenizer and input a dataset prefix was built from."""
    return Path(f"{prefix}.meta.json")


def read_meta(prefix: str | os.PathLike) -> dict[str, Any]:
    """The `<prefix>.meta.json` record, or {} when there is none (data from other tools,
    e.g. Megatron-LM's, carries no meta); an unreadable one is an `L3TrainError`."""
    path = data_meta_path(prefix)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise L3TrainError(f"{path} is unreadable ({err}); recreate it with tools/preprocess_data.py") from err


def _megatron_indexed_module() -> Any:
    with warnings.catch_warnings():
        # megatron-core warns at import that Apex/Transformer Engine are absent.
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _megatron_builder() -> Any:
    return _megatron_indexed_module().IndexedDatasetBuilder


class IndexedDocuments:
    """The documents of a validated `<prefix>.bin/.idx` pair, read with megatron-core's
    `IndexedDataset`.

    A document is a run of sequences whose tokens are contiguous in the .bin file, so a
    batch of consecutive documents, or any window of the token stream, is a single read.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:

        self.prefix = str(prefix)
        # Validate first: megatron asserts or segfaults on missing, truncated or mismatched files.
        self._itemsize, _ = check_indexed_dataset(self.prefix)
        self._dataset = _megatron_indexed_module().IndexedDataset(self.prefix)
        sequence_starts = np.concatenate([[0], np.cumsum(self._dataset.sequence_lengths, dtype=np.int64)])
        # Token offset of each document's start, plus the end of the last one.
        self.document_starts: np.ndarray = sequence_starts[np.asarray(self._dataset.document_indices)]

    @property
    def num_documents(self) -> int:
        return len(self.document_starts) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.document_starts[-1])

    def read(self, start: int, count: int) -> np.ndarray:
        """`count` tokens of the token stream from token `start`, across document ends."""
        return self._dataset.bin_reader.read(
            dtype=self._dataset.index.dtype, count=int(count), offset=int(start) * self._itemsize
        )

    def batches(self, batch_tokens: int = READ_TOKENS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`(tokens, doc_offsets)` of whole consecutive documents, in order: about
        `batch_tokens` tokens per batch (at least one document), document d of the batch
        being `tokens[doc_offsets[d]:doc_offsets[d + 1]]`."""
        starts = self.document_starts
        first = 0
        while first < self.num_documents:
            end = int(np.searchsorted(starts, starts[first] + batch_tokens, side="right")) - 1
            end = min(max(end, first + 1), self.num_documents)
            yield self.read(starts[first], starts[end] - starts[first]), starts[first : end + 1] - starts[first]
            first = end

    def __iter__(self) -> Iterator[np.ndarray]:
        """Each document's tokens, in order."""
        for tokens, offsets in self.batches():
            yield from np.split(tokens, offsets[1:-1])


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _count_lines(path: Path) -> int:
    count = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            count += block.count(b"\n")
            last = block[-1:]
    # A final line without a trailing newline is still a line.
    return count + (last != b"\n")


class _Encoder:
    """Turns one numbered input line into its token array (document + EOD), or None."""

    def __init__(self, tokenizer_path: str, fmt: str, json_key: str, input_path: str):
        self.tokenizer = Tokenizer.load(tokenizer_path)
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.fmt = fmt
        self.json_key = json_key
        self.input_path = input_path

    def __call__(self, item: tuple[int, bytes]) -> np.ndarray | None:
        lineno, raw = item
        text = parse_document(raw, self.fmt, self.json_key, f"{self.input_path}:{lineno}")
        if not text.strip():
            return None
        ids = self.tokenizer.encode(text)
        ids.append(self.tokenizer.eod_id)
        return np.asarray(ids, dtype=self.dtype)


_worker_encoder: _Encoder | None = None


def _init_worker(*args: str) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(*args)


def _encode_in_worker(item: tuple[int, bytes]) -> np.ndarray | None:
    assert _worker_encoder is not None
    return _worker_encoder(item)


def _write_part(
    builder_cls: Any, part: Path, arrays: Iterator[np.ndarray | None], dtype: type[np.integer]
) -> tuple[int, int]:
    """Write one chunk's documents as `part.bin/.idx`; return (documents, tokens)."""
    tmp = part.with_name(part.name + ".tmp")
    documents = tokens = 0
    try:
        builder = builder_cls(f"{tmp}.bin", dtype=dtype)
        for array in arrays:
            if array is None:
                continue
            builder.add_document(array, [array.size])
            documents += 1
            tokens += array.size
        builder.finalize(f"{tmp}.idx")
        for suffix in (".bin", ".idx"):
            _fsync(Path(f"{tmp}{suffix}"))
            os.replace(f"{tmp}{suffix}", f"{part}{suffix}")
    finally:
        for suffix in (".bin", ".idx"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    return documents, tokens


def _prepare_parts_dir(
    parts_dir: Path, manifest: dict[str, Any], log: Callable[[str], None]
) -> None:
    """Keep finished parts only if they were made from the same input and settings."""
    manifest_path = parts_dir / "manifest.json"
    if parts_dir.exists():
        try:
            previous = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous == manifest:
            return
        log(f"discarding partial results in {parts_dir}: made from other input or settings")
        shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")


@dataclass(frozen=True)
class _Chunks:
    """How the input is cut into chunks, and where each chunk's part and marker live."""

    parts_dir: Path
    count: int
    lines: int

    def part(self, k: int) -> Path:
        return self.parts_dir / f"chunk_{k:06d}"

    def done(self, k: int) -> Path:
        return self.part(k).with_suffix(".done")


def _check_preprocess_args(output_prefix: str, workers: int, chunk_lines: int) -> None:
    if output_prefix.endswith((".bin", ".idx")):
        raise L3TrainError(
            f"--output-prefix {output_prefix} should not end in .bin/.idx: both files are "
            f"written as <prefix>.bin and <prefix>.idx"
        )
    if workers < 1:
        raise L3TrainError(f"--workers must be at least 1, got {workers}")
    if chunk_lines < 1:
        raise L3TrainError(f"--chunk-size must be at least 1, got {chunk_lines}")


def _manifest(
    path: Path,
    fmt: str,
    json_key: str,
    tokenizer: Tokenizer,
    dtype: type[np.integer],
    chunk_lines: int,
) -> dict[str, Any]:
    """Everything the finished parts depend on: any change invalidates them."""
    stat = path.stat()
    return {
        "version": _MANIFEST_VERSION,
        "input": str(path),
        "input_bytes": stat.st_size,
        "input_mtime_ns": stat.st_mtime_ns,
        "format": fmt,
        "json_key": json_key,
        "tokenizer_id": tokenizer.tokenizer_id,
        "dtype": np.dtype(dtype).name,
        "chunk_lines": chunk_lines,
    }


_LineEncoder = Callable[[list[tuple[int, bytes]]], Iterable[np.ndarray | None]]


@contextlib.contextmanager
def _line_encoder(workers: int, encoder_args: tuple[str, ...]) -> Iterator[_LineEncoder]:
    """A function from numbered lines to their token arrays, in input order, so the
    output cannot depend on the worker count."""
    if workers == 1:
        yield functools.partial(map, _Encoder(*encoder_args))
        return
    # fork: workers start instantly and inherit imports; they only tokenize.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = context.Pool(workers, initializer=_init_worker, initargs=encoder_args)
    try:
        yield lambda lines: pool.imap(_encode_in_worker, lines, chunksize=_IMAP_CHUNKSIZE)
    finally:
        pool.terminate()
        pool.join()


def _tokenize_chunks(
    path: Path,
    chunks: _Chunks,
    encode: _LineEncoder,
    bar: tqdm,
    builder_cls: Any,
    dtype: type[np.integer],
) -> None:
    """Write the part of every chunk not yet marked done."""

    def counted(arrays: Iterable[np.ndarray | None]) -> Iterator[np.ndarray | None]:
        for array in arrays:
            bar.update(1)
            yield array

    with open(path, "rb") as handle:
        numbered = enumerate(handle, start=1)
        for k in range(chunks.count):
            lines = list(itertools.islice(numbered, chunks.lines))
            if chunks.done(k).exists():
                bar.update(len(lines))
                continue
            arrays = counted(encode(lines))
            documents, tokens = _write_part(builder_cls, chunks.part(k), arrays, dtype)
            # The marker is written last: a chunk without it is redone on resume.
            marker = json.dumps({"documents": documents, "tokens": tokens}) + "\n"
            atomic_write_text(chunks.done(k), marker)


def _meta_record(
    stats: PreprocessStats,
    path: Path,
    fmt: str,
    json_key: str,
    tokenizer_path: str | os.PathLike,
    tokenizer: Tokenizer,
) -> dict[str, Any]:
    """The `<prefix>.meta.json` record: the stats plus the input and tokenizer they came from."""
    return {
        **asdict(stats),
        "input": str(path),
        "format": fmt,
        "json_key": json_key if fmt == "jsonl" else None,
        "tokenizer": str(Path(tokenizer_path).resolve()),
        "tokenizer_id": tokenizer.tokenizer_id,
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
    }


def preprocess(
    input_path: str | os.PathLike,
    output_prefix: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    fmt: str = "auto",
    json_key: str = "text",
    workers: int = 1,
    chunk_lines: int = DEFAULT_CHUNK_LINES,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PreprocessStats:
    """Tokenize `input_path` into `<output_prefix>.bin/.idx` (+ `.meta.json`), resumably."""
    start = time.monotonic()
    output_prefix = str(output_prefix)
    _check_preprocess_args(output_prefix, workers, chunk_lines)
    path = check_input(input_path).resolve()
    fmt = detect_format(path, fmt)
    tokenizer = Tokenizer.load(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    builder_cls = _megatron_builder()

    total_lines = _count_lines(path)
    n_chunks = max(1, math.ceil(total_lines / chunk_lines))
    chunks = _Chunks(Path(f"{output_prefix}.parts"), n_chunks, chunk_lines)
    manifest = _manifest(path, fmt, json_key, tokenizer, dtype, chunk_lines)
    _prepare_parts_dir(chunks.parts_dir, manifest, log)
    reused = sum(chunks.done(k).exists() for k in range(n_chunks))
    log(
        f"preprocessing {path} ({fmt}, {total_lines} lines) -> {output_prefix}.bin/.idx: "
        f"{n_chunks} chunk(s) of {chunk_lines} lines, {workers} worker(s), "
        f"{np.dtype(dtype).name} tokens"
        + (f"; resuming, {reused} chunk(s) already done" if reused else "")
    )
    encoder_args = (str(tokenizer_path), fmt, json_key, str(path))
    with _line_encoder(workers, encoder_args) as encode, tqdm(
        total=total_lines, unit="doc", desc="tokenize", disable=not progress
    ) as bar:
        _tokenize_chunks(path, chunks, encode, bar, builder_cls, dtype)

    parts = [chunks.part(k) for k in range(n_chunks)]
    documents, tokens = _merge_parts(builder_cls, parts, output_prefix, dtype)
    if documents == 0:
        raise L3TrainError(f"{path} contains no non-empty documents")
    stats = PreprocessStats(
        documents=documents,
        tokens=tokens,
        chunks=n_chunks,
        chunks_reused=reused,
        dtype=np.dtype(dtype).name,
        seconds=round(time.monotonic() - start, 2),
    )
    meta = _meta_record(stats, path, fmt, json_key, tokenizer_path, tokenizer)
    atomic_write_text(data_meta_path(output_prefix), json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(chunks.parts_dir)
    return stats


def _merge_parts(
    builder_cls: Any, parts: list[Path], output_prefix: str, dtype: type[np.integer]
) -> tuple[int, int]:
    """Concatenate the parts in order into `<output_prefix>.bin/.idx`, atomically.

    Builds under a temporary prefix beside the output, then renames .bin and .idx into
    place. The old meta file goes first, so a crash between the renames can leave an
    inconsistent pair (caught by `check_indexed_dataset`) but never
    a pair that claims the wrong tokenizer.
    """
    out = Path(output_prefix)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        builder = builder_cls(f"{tmp}.bin", dtype=dtype)
        for part in parts:
            builder.add_index(str(part))
        builder.finalize(f"{tmp}.idx")
        documents = len(builder.document_indices) - 1
        tokens = int(sum(builder.sequence_lengths))
        if documents:
            for suffix in (".bin", ".idx"):
                _fsync(Path(f"{tmp}{suffix}"))
            data_meta_path(out).unlink(missing_ok=True)
            os.replace(f"{tmp}.bin", f"{out}.bin")
            os.replace(f"{tmp}.idx", f"{out}.idx")
    finally:
        for suffix in (".bin", ".idx"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    return documents, tokens
