"""Preprocessing: tokenize a corpus of many files into a Megatron indexed dataset (.bin/.idx).

The output is written with megatron-core's own `IndexedDatasetBuilder`, so the files are
exactly what `GPTDataset` (and Megatron-LM's tooling) reads; each document is followed
by the EOD token. Token dtype is uint16 below 65500 vocabulary entries, else int32
(megatron's `DType.optimal_dtype` rule).

The inputs are files in any format of l3train.data.sources (text, JSONL, Parquet; text and
JSONL also .gz/.zst), named as files, directories or globs, each streamed record by record.
Tokenizing a large corpus takes hours, so the work is resumable: each input file is cut into
fixed chunks of records (one record = one document), each chunk is written as a partial
dataset under `<output_prefix>.parts/` and marked done only once complete, and a file whose
chunks are all done is marked too. A rerun with the same inputs, tokenizer and settings
skips finished work (a manifest detects any change, which discards the parts). Finally the
parts are concatenated in input order with `builder.add_index` into a temporary prefix and
renamed into place, so the final `.bin`/`.idx` never exist half-written. Chunks and ordered
`Pool.imap` make the output byte-identical for any worker count and any chunk size, and the
same files give the same dataset however they are listed as directories or globs.

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
import gc
import itertools
import json
import multiprocessing
import os
import shutil
import struct
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from l3train.data.sources import detect_format, document_text, expand_inputs, iter_records
from l3train.data.tokenizer import Tokenizer
from l3train.errors import L3TrainError
from l3train.utils.atomic import atomic_write_text

DEFAULT_CHUNK_LINES = 50_000  # a chunk's records are held in memory while tokenized
# Lines per Pool task: large enough to amortize inter-process overhead, small enough
# that both workers stay busy on small chunks.
_IMAP_CHUNKSIZE = 64
_MANIFEST_VERSION = 2
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


def megatron_builder() -> Any:
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


class _Encoder:
    """Turns one record (format, file, number, payload) into its token array (document + EOD), or None."""

    def __init__(self, tokenizer_path: str, json_key: str):
        self.tokenizer = Tokenizer.load(tokenizer_path)
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.json_key = json_key

    def __call__(self, item: tuple[str, str, int, bytes | str | None]) -> np.ndarray | None:
        fmt, path, number, payload = item
        text = document_text(payload, fmt, self.json_key, f"{path}:{number}")
        if not text.strip():
            return None
        ids = self.tokenizer.encode(text)
        ids.append(self.tokenizer.eod_id)
        return np.asarray(ids, dtype=self.dtype)


_worker_encoder: _Encoder | None = None


def _init_worker(*args: str) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(*args)


def _encode_in_worker(item: tuple[str, str, int, bytes | str | None]) -> np.ndarray | None:
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


def _prepare_parts_dir(parts_dir: Path, manifest: dict[str, Any], log: Callable[[str], None], shared: bool) -> None:
    """Keep finished parts only if they were made from the same inputs and settings. `shared`:
    other processes of the same split job may be writing parts here, so a different manifest
    is refused instead of discarded."""
    manifest_path = parts_dir / "manifest.json"
    if parts_dir.exists():
        try:
            previous = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous == manifest or (shared and previous is None):
            if previous is None:
                atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
            return
        if shared:
            raise L3TrainError(f"{parts_dir} holds parts made from other inputs or settings; run every task (and the "
                               f"merge) with the same arguments, or remove {parts_dir}")
        log(f"discarding partial results in {parts_dir}: made from other input or settings")
        shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=shared)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")


@dataclass(frozen=True)
class _Parts:
    """Where input file i's chunk k, its done marker and the file's own marker live."""

    directory: Path

    def part(self, index: int, k: int) -> Path:
        return self.directory / f"input_{index:05d}_chunk_{k:06d}"

    def done(self, index: int, k: int) -> Path:
        return self.part(index, k).with_suffix(".done")

    def input_done(self, index: int) -> Path:
        return self.directory / f"input_{index:05d}.done"


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


def _manifest(paths: list[Path], formats: list[str], json_key: str, tokenizer: Tokenizer, dtype: type[np.integer],
              chunk_lines: int) -> dict[str, Any]:
    """Everything the finished parts depend on: any change invalidates them."""
    return {
        "version": _MANIFEST_VERSION,
        "inputs": [{"path": str(path), "bytes": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns,
                    "format": fmt} for path, fmt in zip(paths, formats)],
        "json_key": json_key,
        "tokenizer_id": tokenizer.tokenizer_id,
        "dtype": np.dtype(dtype).name,
        "chunk_lines": chunk_lines,
    }


_RecordEncoder = Callable[[list[tuple[str, str, int, bytes | str | None]]], Iterable[np.ndarray | None]]


@contextlib.contextmanager
def _record_encoder(workers: int, encoder_args: tuple[str, ...]) -> Iterator[_RecordEncoder]:
    """A function from records to their token arrays, in input order, so the output cannot
    depend on the worker count."""
    if workers == 1:
        yield functools.partial(map, _Encoder(*encoder_args))
        return
    # fork: workers start instantly and inherit imports; they only tokenize.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = context.Pool(workers, initializer=_init_worker, initargs=encoder_args)
    try:
        yield lambda records: pool.imap(_encode_in_worker, records, chunksize=_IMAP_CHUNKSIZE)
    finally:
        pool.terminate()
        pool.join()


def _tokenize_input(index: int, path: Path, fmt: str, json_key: str, parts: _Parts, chunk_lines: int,
                    encode: _RecordEncoder, bar: tqdm, builder_cls: Any, dtype: type[np.integer]) -> int:
    """Write the parts of input file `index` not yet marked done, streaming its records chunk by
    chunk (a chunk's records are the only ones held); returns its number of chunks."""
    if parts.input_done(index).exists():
        done = json.loads(parts.input_done(index).read_text())
        bar.update(done["records"])
        return done["chunks"]

    def counted(arrays: Iterable[np.ndarray | None]) -> Iterator[np.ndarray | None]:
        for array in arrays:
            bar.update(1)
            yield array

    records = iter_records(path, fmt, json_key)
    chunks = documents = total = 0
    while chunk := list(itertools.islice(records, chunk_lines)):
        total += len(chunk)
        marker = parts.done(index, chunks)
        if marker.exists():
            bar.update(len(chunk))
        else:
            arrays = counted(encode([(fmt, str(path), number, payload) for number, payload in chunk]))
            written, tokens = _write_part(builder_cls, parts.part(index, chunks), arrays, dtype)
            # The marker is written last: a chunk without it is redone on resume.
            atomic_write_text(marker, json.dumps({"documents": written, "tokens": tokens}) + "\n")
        documents += json.loads(marker.read_text())["documents"]
        chunks += 1
    if documents == 0:
        raise L3TrainError(f"{path} holds no non-empty document; remove it from the inputs")
    atomic_write_text(parts.input_done(index), json.dumps({"chunks": chunks, "records": total}) + "\n")
    return chunks


def _meta_record(stats: PreprocessStats, paths: list[Path], formats: list[str], json_key: str,
                 tokenizer_path: str | os.PathLike, tokenizer: Tokenizer) -> dict[str, Any]:
    """The `<prefix>.meta.json` record: the stats plus the inputs and tokenizer they came from
    (`input`, `format`: those of a single input file, else None and "mixed")."""
    single = len(paths) == 1
    return {
        **asdict(stats),
        "input": str(paths[0]) if single else None,
        "inputs": [str(path) for path in paths],
        "format": formats[0] if len(set(formats)) == 1 else "mixed",
        "json_key": json_key if set(formats) - {"text"} else None,
        "tokenizer": str(Path(tokenizer_path).resolve()),
        "tokenizer_id": tokenizer.tokenizer_id,
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
    }


@dataclass(frozen=True)
class Task:
    """One process's share of preprocessing split over several (a SLURM array: one task per group
    of input files, then one merge). Task `index` of `count` tokenizes input files
    [index·n/count, (index+1)·n/count) of the n in order; `merge` joins every file's parts into
    the dataset once all are tokenized. The default is the whole job in one process."""

    index: int = 0
    count: int = 1
    tokenize: bool = True
    merge: bool = True

    def owns(self, file_index: int, files: int) -> bool:
        return self.tokenize and file_index * self.count // files == self.index

    @property
    def shared(self) -> bool:
        return self.count > 1 or not self.tokenize


def _file_chunks(parts: _Parts, paths: list[Path]) -> list[int]:
    """Every input file's chunk count, from its done marker; refused while any file is not done."""
    missing = [path for index, path in enumerate(paths) if not parts.input_done(index).exists()]
    if missing:
        raise L3TrainError(f"{len(missing)} of {len(paths)} input file(s) are not tokenized yet (the first: "
                           f"{missing[0]}); run their tasks (a rerun skips finished files), then merge")
    return [json.loads(parts.input_done(index).read_text())["chunks"] for index in range(len(paths))]


def preprocess(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    fmt: str = "auto",
    json_key: str = "text",
    workers: int = 1,
    chunk_lines: int = DEFAULT_CHUNK_LINES,
    progress: bool = True,
    log: Callable[[str], None] = print,
    task: Task = Task(),
) -> PreprocessStats:
    """Tokenize the files `inputs` names (files, directories, globs: l3train.data.sources), in
    order, into `<output_prefix>.bin/.idx` (+ `.meta.json`), resumably; or `task`'s share of
    that (its files' parts, or the merge). The stats are the dataset's, or without a merge this
    task's parts'."""
    start = time.monotonic()
    output_prefix = str(output_prefix)
    _check_preprocess_args(output_prefix, workers, chunk_lines)
    paths = [path.resolve() for path in expand_inputs(inputs)]
    formats = [detect_format(path, fmt) for path in paths]
    tokenizer = Tokenizer.load(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    builder_cls = megatron_builder()

    parts = _Parts(Path(f"{output_prefix}.parts"))
    _prepare_parts_dir(parts.directory, _manifest(paths, formats, json_key, tokenizer, dtype, chunk_lines), log,
                       task.shared)
    mine = [index for index in range(len(paths)) if task.owns(index, len(paths))]
    reused = sum(len(list(parts.directory.glob(f"input_{index:05d}_chunk_*.done"))) for index in mine)
    if mine:
        share = "" if len(mine) == len(paths) else f" (files {mine[0] + 1}-{mine[-1] + 1} of {len(paths)}: task " \
                                                      f"{task.index} of {task.count})"
        log(f"preprocessing {paths[0] if len(paths) == 1 else f'{len(paths)} files'}{share} "
            f"({', '.join(sorted(set(formats)))}) -> {output_prefix}.bin/.idx: chunks of {chunk_lines} documents, "
            f"{workers} worker(s), {np.dtype(dtype).name} tokens"
            + (f"; resuming, {reused} chunk(s) already done" if reused else ""))
    with _record_encoder(workers if mine else 1, (str(tokenizer_path), json_key)) as encode, tqdm(
        unit="doc", desc="tokenize", disable=not progress or not mine
    ) as bar:
        for index in mine:
            _tokenize_input(index, paths[index], formats[index], json_key, parts, chunk_lines, encode, bar,
                            builder_cls, dtype)
    if not task.merge:
        written = [json.loads(marker.read_text()) for index in mine
                   for marker in sorted(parts.directory.glob(f"input_{index:05d}_chunk_*.done"))]
        return PreprocessStats(documents=sum(m["documents"] for m in written), tokens=sum(m["tokens"] for m in written),
                               chunks=len(written), chunks_reused=reused, dtype=np.dtype(dtype).name,
                               seconds=round(time.monotonic() - start, 2))

    chunks = _file_chunks(parts, paths)
    ordered = [parts.part(index, k) for index, count in enumerate(chunks) for k in range(count)]
    documents, tokens = _merge_parts(builder_cls, ordered, output_prefix, dtype)
    stats = PreprocessStats(
        documents=documents,
        tokens=tokens,
        chunks=len(ordered),
        chunks_reused=reused,
        dtype=np.dtype(dtype).name,
        seconds=round(time.monotonic() - start, 2),
    )
    meta = _meta_record(stats, paths, formats, json_key, tokenizer_path, tokenizer)
    atomic_write_text(data_meta_path(output_prefix), json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(parts.directory)
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
        # megatron's add_index runs gc.collect() after every part: over the objects this process
        # holds (torch, megatron, the tokenizer) that took 0.2 s a part, half of preprocessing 16
        # shards. Frozen objects are not traversed; the parts' indices are freed as they go anyway.
        gc.freeze()
        try:
            for part in parts:
                builder.add_index(str(part))
        finally:
            gc.unfreeze()
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
