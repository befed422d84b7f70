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

megatron-core is imported lazily: importing it costs several seconds, which `--help`,
argument errors and the Pool workers (which only tokenize) should not pay.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

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


def data_meta_path(prefix: str | os.PathLike) -> Path:
    """Sidecar recording the tokenizer and input a dataset prefix was built from."""
    return Path(f"{prefix}.meta.json")


def _megatron_builder() -> Any:
    with warnings.catch_warnings():
        # megatron-core warns at import that Apex/Transformer Engine are absent.
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder


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
    if output_prefix.endswith((".bin", ".idx")):
        raise L3TrainError(
            f"--output-prefix {output_prefix} should not end in .bin/.idx: both files are "
            f"written as <prefix>.bin and <prefix>.idx"
        )
    if workers < 1:
        raise L3TrainError(f"--workers must be at least 1, got {workers}")
    if chunk_lines < 1:
        raise L3TrainError(f"--chunk-size must be at least 1, got {chunk_lines}")
    path = check_input(input_path).resolve()
    fmt = detect_format(path, fmt)
    tokenizer = Tokenizer.load(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    builder_cls = _megatron_builder()

    total_lines = _count_lines(path)
    n_chunks = max(1, math.ceil(total_lines / chunk_lines))
    parts_dir = Path(f"{output_prefix}.parts")
    stat = path.stat()
    manifest = {
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
    _prepare_parts_dir(parts_dir, manifest, log)

    def part_path(k: int) -> Path:
        return parts_dir / f"chunk_{k:06d}"

    def done_path(k: int) -> Path:
        return parts_dir / f"chunk_{k:06d}.done"

    reused = sum(done_path(k).exists() for k in range(n_chunks))
    log(
        f"preprocessing {path} ({fmt}, {total_lines} lines) -> {output_prefix}.bin/.idx: "
        f"{n_chunks} chunk(s) of {chunk_lines} lines, {workers} worker(s), "
        f"{np.dtype(dtype).name} tokens"
        + (f"; resuming, {reused} chunk(s) already done" if reused else "")
    )
    encoder_args = (str(tokenizer_path), fmt, json_key, str(path))
    pool = None
    if workers > 1:
        # fork: workers start instantly and inherit imports; they only tokenize.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        pool = context.Pool(workers, initializer=_init_worker, initargs=encoder_args)
    else:
        encoder = _Encoder(*encoder_args)
    bar = tqdm(total=total_lines, unit="doc", desc="tokenize", disable=not progress)

    def encode(lines: list[tuple[int, bytes]]) -> Iterator[np.ndarray | None]:
        # Ordered results whatever the worker count: the output cannot depend on it.
        if pool is not None:
            arrays = pool.imap(_encode_in_worker, lines, chunksize=_IMAP_CHUNKSIZE)
        else:
            arrays = map(encoder, lines)
        for array in arrays:
            bar.update(1)
            yield array

    try:
        with open(path, "rb") as handle:
            numbered = enumerate(handle, start=1)
            for k in range(n_chunks):
                lines = list(itertools.islice(numbered, chunk_lines))
                if done_path(k).exists():
                    bar.update(len(lines))
                    continue
                documents, tokens = _write_part(builder_cls, part_path(k), encode(lines), dtype)
                # The marker is written last: a chunk without it is redone on resume.
                marker = json.dumps({"documents": documents, "tokens": tokens}) + "\n"
                atomic_write_text(done_path(k), marker)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    parts = [part_path(k) for k in range(n_chunks)]
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
    meta = {
        **asdict(stats),
        "input": str(path),
        "format": fmt,
        "json_key": json_key if fmt == "jsonl" else None,
        "tokenizer": str(Path(tokenizer_path).resolve()),
        "tokenizer_id": tokenizer.tokenizer_id,
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
    }
    atomic_write_text(data_meta_path(output_prefix), json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(parts_dir)
    return stats


def _merge_parts(
    builder_cls: Any, parts: list[Path], output_prefix: str, dtype: type[np.integer]
) -> tuple[int, int]:
    """Concatenate the parts in order into `<output_prefix>.bin/.idx`, atomically.

    Builds under a temporary prefix beside the output, then renames .bin and .idx into
    place. The old meta file goes first, so a crash between the renames can leave an
    inconsistent pair (caught by `l3train.data.dataset.check_indexed_dataset`) but never
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
