"""Corpus sources: which files an input names, and their documents, streamed with bounded memory.

A pretraining corpus is hundreds of shards: `expand_inputs` turns files, directories
(every corpus file under them, sorted) and globs into one ordered list of files, and
`iter_records` streams one file's records without holding it: plain text (one document per
line), JSONL (one document per line under a key, default "text") and Parquet (one document
per row, in a column, read batch by batch with pyarrow), text and JSONL also gzip- or
zstd-compressed (.gz, .zst: decompressed as a stream; zstandard for .zst). A record is
(its number in the file, its payload): the raw bytes of a line, parsed by
`document_text` (possibly in another process), or a Parquet cell's string.

Bad input is one `L3TrainError` naming the file (and line or row): a glob matching nothing,
a directory without corpus files, a corrupt gzip or zstd stream or Parquet file, a missing
text key or column, a value that is not a string.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from l3train.errors import L3TrainError

FORMATS = ("text", "jsonl", "parquet")
COMPRESSIONS = (".gz", ".zst")
CORPUS_SUFFIXES = (".jsonl", ".json", ".txt", ".text", ".parquet")
PARQUET_BATCH_ROWS = 4096  # rows per Parquet read: the memory a shard takes while it streams


def _compression(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return suffix if suffix in COMPRESSIONS else None


def _base_suffix(path: Path) -> str:
    """The suffix that names the format: `.jsonl` of `x.jsonl.zst`."""
    return (path.with_suffix("") if _compression(path) else path).suffix.lower()


def is_corpus_file(path: Path) -> bool:
    return _base_suffix(path) in CORPUS_SUFFIXES and not (_compression(path) and _base_suffix(path) == ".parquet")


def expand_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The files `inputs` name, in order: a file as it is, a directory's corpus files (sorted,
    recursively), a glob's matches (sorted); each file once."""
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not specs:
        raise L3TrainError("no input given; pass corpus files, directories or globs")
    files: list[Path] = []
    for spec in map(str, specs):
        if glob.has_magic(spec):
            found = sorted(Path(match) for match in glob.glob(spec, recursive=True) if Path(match).is_file())
            if not found:
                raise L3TrainError(f"input glob {spec!r} matches no file")
        elif Path(spec).is_dir():
            found = sorted(path for path in Path(spec).rglob("*") if path.is_file() and is_corpus_file(path))
            if not found:
                raise L3TrainError(f"input directory {spec} holds no corpus file "
                                   f"({', '.join(CORPUS_SUFFIXES)}, text and JSONL also .gz or .zst)")
        elif Path(spec).is_file():
            found = [Path(spec)]
        else:
            raise L3TrainError(f"input file not found: {spec} (build the default corpus with tools/build_corpus.py)")
        files += [path for path in found if path not in files]
    return files


def check_input(path: str | os.PathLike) -> Path:
    """`path` as a Path, or `L3TrainError` if it is not a readable file."""
    path = Path(path)
    if not path.is_file():
        raise L3TrainError(f"input file not found: {path} (build the default corpus with tools/build_corpus.py)")
    return path


def detect_format(path: str | os.PathLike, fmt: str = "auto") -> str:
    """text, jsonl or parquet; `auto` decides by extension, under any compression suffix
    (.jsonl/.json = JSONL, .parquet = Parquet, anything else text)."""
    if fmt not in ("auto", *FORMATS):
        raise L3TrainError(f"input format must be auto, {', '.join(FORMATS)}; got {fmt!r}")
    if fmt != "auto":
        return fmt
    suffix = _base_suffix(Path(path))
    return "parquet" if suffix == ".parquet" else "jsonl" if suffix in (".jsonl", ".json") else "text"


def document_text(payload: bytes | str | None, fmt: str, json_key: str, where: str) -> str:
    """The document of one record; `where` (`file:line`, `file:row`) prefixes any error.

    Lines come as bytes, so that undecodable input is reported with its line number wherever
    (main process or preprocessing worker) it is parsed. Blank lines give "".
    """
    if fmt == "parquet":
        if payload is not None and not isinstance(payload, str):
            raise L3TrainError(f"{where}: column {json_key!r} holds {type(payload).__name__}, not a string")
        return payload or ""
    try:
        line = payload.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise L3TrainError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if fmt == "text" or not line.strip():
        return line
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise L3TrainError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict) or json_key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise L3TrainError(f"{where}: no {json_key!r} field (found {keys}); see --json-key")
    text = record[json_key]
    if not isinstance(text, str):
        raise L3TrainError(f"{where}: field {json_key!r} is {type(text).__name__}, not a string")
    return text


def _zstd_blocks(raw: BinaryIO) -> Iterator[bytes]:
    """The decompressed bytes of every zstd frame of `raw`, in order; a frame cut short raises
    (zstandard's stream reader ends quietly there, which would drop the end of a shard)."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    frame, fed = decompressor.decompressobj(), False
    while data := raw.read(1 << 20):
        while data:
            yield frame.decompress(data)
            fed = True
            if frame.eof:  # the rest belongs to the next frame
                data, frame, fed = frame.unused_data, decompressor.decompressobj(), False
            else:
                data = b""
    if fed and not frame.eof:
        raise zstandard.ZstdError("the last frame ends early (a truncated file)")


def _split_lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines (with their newline) of a stream given as blocks."""
    pending = b""
    for block in blocks:
        *lines, pending = (pending + block).split(b"\n")
        yield from (line + b"\n" for line in lines)
    if pending:
        yield pending


@contextlib.contextmanager
def _open_lines(path: Path) -> Iterator[Iterator[bytes]]:
    """The lines of `path`, decompressed on the fly."""
    compression = _compression(path)
    if compression == ".gz":
        with gzip.open(path, "rb") as stream:
            yield iter(stream)
    elif compression == ".zst":
        with open(path, "rb") as raw:
            yield _split_lines(_zstd_blocks(raw))
    else:
        with open(path, "rb") as stream:
            yield iter(stream)


def _line_records(path: Path) -> Iterator[tuple[int, bytes]]:
    corrupt: tuple[type[Exception], ...] = (EOFError, zlib.error, gzip.BadGzipFile)
    if _compression(path) == ".zst":
        import zstandard

        corrupt += (zstandard.ZstdError,)
    line = 0
    try:
        with _open_lines(path) as lines:
            for line, raw in enumerate(lines, start=1):
                yield line, raw
    except corrupt as err:
        raise L3TrainError(f"{path}: corrupt {_compression(path)} stream after line {line} ({err}); "
                           f"recompress or replace the file") from None


def _parquet_records(path: Path, column: str) -> Iterator[tuple[int, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if column not in names:
            raise L3TrainError(f"{path}: no {column!r} column (found {sorted(names)}); see --json-key")
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
            for value in batch.column(0).to_pylist():
                row += 1
                yield row, value
    except (pa.ArrowException, OSError) as err:
        raise L3TrainError(f"{path}: not a readable Parquet file after row {row} "
                           f"({str(err).splitlines()[0][:200]}); replace the file") from None


def iter_records(path: str | os.PathLike, fmt: str, json_key: str = "text") -> Iterator[tuple[int, bytes | str | None]]:
    """(record number, payload) of every record of one file, streamed (`document_text` parses a payload)."""
    path = Path(path)
    return _parquet_records(path, json_key) if fmt == "parquet" else _line_records(path)


def iter_documents(path: str | os.PathLike, fmt: str = "auto", json_key: str = "text") -> Iterator[str]:
    """The non-empty documents of a corpus file, in file order."""
    path = check_input(path)
    fmt = detect_format(path, fmt)
    for number, payload in iter_records(path, fmt, json_key):
        text = document_text(payload, fmt, json_key, f"{path}:{number}")
        if text.strip():
            yield text


def sample_documents(paths: list[Path], count: int, seed: int, fmt: str = "auto", json_key: str = "text",
                     ) -> list[str]:
    """A seeded sample of about `count` non-empty documents spread over `paths` in proportion to
    their sizes (at least one from each): every file is streamed once through a reservoir of its
    quota, drawn with its own generator (`seed`, its position), so the sample is the same for
    the same files and seed however the machine schedules the reads; in file order."""
    import random

    sizes = [path.stat().st_size for path in paths]
    total = max(sum(sizes), 1)
    sample: list[str] = []
    for index, (path, size) in enumerate(zip(paths, sizes)):
        quota = max(1, round(count * size / total))
        rng = random.Random(f"{seed}/{index}")
        reservoir: list[str] = []
        for seen, text in enumerate(iter_documents(path, fmt, json_key)):
            if seen < quota:
                reservoir.append(text)
            elif (slot := rng.randrange(seen + 1)) < quota:
                reservoir[slot] = text
        sample += reservoir
    return sample
