"""Preprocessing at scale (tools/bench_data.py): tokens/s against workers on a corpus of many
shards, and where a single worker's time goes.

The shards are the source corpus repeated, cut into `shards` files that cycle through the
formats a downloaded corpus comes in (JSONL.gz, Parquet, JSONL.zst, JSONL), so reading,
decompression and parsing are measured with the tokenizer. Runs alternate between the
worker counts (1, 2, 1, 2, ...), so a slow phase of the machine hits both alike; the figure
of each is the median. The phases of one worker are timed apart on the same shards:
reading and parsing records, tokenizing them (sentencepiece), and writing the .bin/.idx.
"""

from __future__ import annotations

import gzip
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from l3train.data.indexed import megatron_builder, preprocess, token_dtype
from l3train.data.sources import detect_format, document_text, iter_records
from l3train.data.tokenizer import Tokenizer

SHARD_FORMATS = (".jsonl.gz", ".parquet", ".jsonl.zst", ".jsonl")


def write_shards(corpus: Path, directory: Path, shards: int, repeat: int) -> list[Path]:
    """`corpus` (JSONL) `repeat` times over, cut into `shards` files of cycling formats."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = corpus.read_bytes().splitlines(keepends=True) * repeat
    size = -(-len(lines) // shards)
    paths = []
    for index in range(shards):
        part = lines[index * size:(index + 1) * size]
        path = directory / f"shard_{index:03d}{SHARD_FORMATS[index % len(SHARD_FORMATS)]}"
        if path.suffix == ".parquet":
            pq.write_table(pa.table({"text": [json.loads(line)["text"] for line in part]}), path)
        elif path.suffix == ".gz":
            path.write_bytes(gzip.compress(b"".join(part), compresslevel=6))
        elif path.suffix == ".zst":
            path.write_bytes(zstandard.ZstdCompressor().compress(b"".join(part)))
        else:
            path.write_bytes(b"".join(part))
        paths.append(path)
    return paths


def phases(paths: list[Path], tokenizer_path: Path) -> dict[str, float]:
    """Seconds a single worker spends reading and parsing, tokenizing, and writing."""
    tokenizer = Tokenizer.load(tokenizer_path)
    start = time.perf_counter()
    texts = [document_text(payload, fmt, "text", f"{path}:{number}") for path in paths
             for fmt in [detect_format(path)] for number, payload in iter_records(path, fmt)]
    read = time.perf_counter() - start
    start = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    arrays = [np.asarray([*tokenizer.encode(text), tokenizer.eod_id], dtype=dtype) for text in texts]
    tokenize = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="l3train-bench-") as scratch:
        start = time.perf_counter()
        builder = megatron_builder()(f"{scratch}/out.bin", dtype=dtype)
        for array in arrays:
            builder.add_document(array, [array.size])
        builder.finalize(f"{scratch}/out.idx")
        write = time.perf_counter() - start
    return {"read and parse": read, "tokenize": tokenize, "write": write}


def bench_preprocess_workers(corpus: Path, tokenizer_path: Path, shards: int, repeat: int, repeats: int,
                             log: Callable[[str], None] = print) -> dict[str, float]:
    """Median tokens/s of tools/preprocess_data.py's library call at 1 and 2 workers, interleaved."""
    megatron_builder()  # imported once before timing (seconds), as a long run pays it once
    with tempfile.TemporaryDirectory(prefix="l3train-bench-") as scratch:
        directory = Path(scratch) / "shards"
        directory.mkdir()
        paths = write_shards(corpus, directory, shards, repeat)
        speeds: dict[int, list[float]] = {1: [], 2: []}
        for rep in range(repeats):
            for workers in (1, 2):
                stats = preprocess(directory, Path(scratch) / f"out_{rep}_{workers}", tokenizer_path,
                                   workers=workers, progress=False, log=lambda _line: None)
                speeds[workers].append(stats.tokens / stats.seconds)
                log(f"  repetition {rep + 1}: {workers} worker(s) {speeds[workers][-1] / 1e3:,.0f}K tokens/s "
                    f"({stats.tokens:,} tokens, {shards} shards)")
        one, two = statistics.median(speeds[1]), statistics.median(speeds[2])
        log(f"preprocessing {stats.tokens:,} tokens in {shards} shards ({', '.join(SHARD_FORMATS)}): "
            f"1 worker {one / 1e3:,.0f}K tokens/s, 2 workers {two / 1e3:,.0f}K tokens/s ({two / one:.2f}x)")
        spent = phases(paths, tokenizer_path)
        total = sum(spent.values())
        log("one worker's time: " + ", ".join(f"{name} {seconds:.1f} s ({seconds / total:.0%})"
                                              for name, seconds in spent.items()))
        return {"workers_1": one, "workers_2": two, **spent}
