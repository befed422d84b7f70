"""CPU benchmarks: the fast LZW scan against the paper's loop, and the sorted L³ row
attention against the padded baseline (time and peak memory).

Each attention variant runs in a fresh child process, so its peak resident set is its
own: peak memory is the growth of that process's peak over its state before the timed
passes. Results are reported through `log` (default: print) as lines of ratios, because
shared machines are noisy and only ratios measured side by side are meaningful.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from l3train.allocation.lzw import fast_lzw_counts, reference_lzw_counts
from l3train.data.indexed import IndexedDocuments, preprocess

Result = TypeVar("Result")


def load_documents(prefix: str, total_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents of an indexed dataset as (tokens, offsets), cycled to `total_tokens`.

    The EOD token that preprocessing appends to every document is dropped, as the
    allocation scan does (the paper's documents have no EOD)."""
    docs = [np.asarray(doc, dtype=np.int64)[:-1] for doc in IndexedDocuments(prefix)]
    chosen, count = [], 0
    while count < total_tokens:
        for doc in docs:
            chosen.append(doc)
            count += len(doc)
            if count >= total_tokens:
                break
    lengths = np.array([len(d) for d in chosen])
    return np.concatenate(chosen), np.concatenate([[0], np.cumsum(lengths)])


def best_time(fn: Callable[[], Result], repeats: int) -> tuple[Result, float]:
    """(result, fastest wall time) of `repeats` calls."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def bench_lzw(tokens: np.ndarray, offsets: np.ndarray, vocab: int, repeats: int,
              log: Callable[[str], None] = print) -> None:
    """Time the C trie and the reference loop on the same documents; their codewords must agree."""
    warm = offsets[offsets <= 1000]
    fast_lzw_counts(tokens[:warm[-1]], vocab, warm)  # compile the C helper outside the timing
    fast, fast_s = best_time(lambda: fast_lzw_counts(tokens, vocab, offsets), repeats)
    reference, reference_s = best_time(lambda: reference_lzw_counts(tokens, vocab, offsets), repeats)
    assert fast == reference, "fast LZW differs from the reference"
    log(f"LZW on {len(tokens):,} tokens, {len(offsets) - 1:,} documents, {len(fast):,} codewords (identical); "
        f"best of {repeats}")
    log(f"  reference loop  {reference_s:8.2f} s   {len(tokens) / reference_s / 1e6:8.2f} M tok/s")
    log(f"  fast (C trie)   {fast_s:8.2f} s   {len(tokens) / fast_s / 1e6:8.2f} M tok/s")
    log(f"  speed-up        {reference_s / fast_s:8.1f}x")


def _attention_child(variant: str, rows: np.ndarray, ids: np.ndarray, d_model: int, repeats: int,
                     queue: mp.Queue) -> None:
    """In a fresh process: (best seconds, peak MB above the warmed-up state) of one variant."""
    import torch

    from l3train.model import l3_attention
    from l3train.model.l3_layer import bounds_from_rows

    torch.set_num_threads(1)
    torch.manual_seed(0)
    bounds = bounds_from_rows(rows)
    keys = torch.randn(int(bounds[-1]), d_model).mul_(0.02).requires_grad_()
    x = torch.randn(len(ids), d_model, requires_grad=True)
    token_ids = torch.from_numpy(ids)
    fn = {"kernel": functools.partial(l3_attention.row_attention, implementation="cpu"),
          "sorted": functools.partial(l3_attention.row_attention, implementation="torch"),
          "padded": l3_attention.row_attention_padded}[variant]
    fn(x, token_ids, bounds, keys, keys).square().sum().backward()  # warm-up: allocator, thread pools
    x.grad = keys.grad = None
    baseline_kb = resident_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to now
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x, token_ids, bounds, keys, keys).square().sum().backward()
        times.append(time.perf_counter() - start)
        x.grad = keys.grad = None
    queue.put((min(times), max(0, resident_kb("VmHWM") - baseline_kb) / 1024))


def _matmul_child(d_model: int, repeats: int, queue: mp.Queue) -> None:
    """In a fresh process: the best FLOP/s of a dense (4096 × d) @ (d × 4096) matmul, 1 thread."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(4096, d_model), torch.randn(d_model, 4096)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    queue.put(2 * 4096 * d_model * 4096 / min(times))


def _in_child(target: Callable, *args) -> Any:
    """`target(*args, queue)` in a fresh spawned process; what it puts on the queue."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def resident_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def bench_attention(rows: np.ndarray, ids: np.ndarray, d_model: int, repeats: int,
                    log: Callable[[str], None] = print) -> None:
    """Forward+backward of the row attention (tied keys/values, 1 thread) at allocation `rows`
    over the positions `ids`: the CPU kernel, the sorted torch implementation and the padded
    baseline."""
    results = {variant: _in_child(_attention_child, variant, rows, ids, d_model, repeats)
               for variant in ("kernel", "sorted", "padded")}
    matmul_flops = _in_child(_matmul_child, d_model, repeats)
    batch_rows = rows[ids]
    log(f"L³ fwd+bwd: {len(ids):,} positions ({len(np.unique(ids)):,} unique ids), d={d_model}, tied, "
        f"v={rows.sum():,}, k={rows.max()}, mean d_t over positions {batch_rows.mean():.1f}, "
        f"max {batch_rows.max()}; 1 thread")
    kernel_s, kernel_mb = results["kernel"]
    for variant, (seconds, megabytes) in results.items():
        log(f"  {variant:<7} {seconds * 1e3:9.1f} ms ({seconds / kernel_s:6.2f}x kernel)   "
            f"peak +{megabytes:8.1f} MB ({megabytes / max(kernel_mb, 1e-9):6.2f}x kernel)")
    # Useful FLOPs of forward + backward: 3 × forward's 2·Σ_p d_t·(d_in + d_emb) (tied: 2d).
    useful = 3 * 2 * batch_rows.sum() * 2 * d_model
    for variant in ("kernel", "sorted"):
        flops = useful / results[variant][0]
        log(f"  {variant} achieves {flops / 1e9:.2f} GFLOP/s (useful), {flops / matmul_flops:.2f}x a "
            f"dense 4096 x {d_model} x 4096 matmul's {matmul_flops / 1e9:.1f} GFLOP/s in this run")


def bench_preprocessing(corpus: str, tokenizer: str, log: Callable[[str], None] = print) -> None:
    """Tokenizing `corpus` into .bin/.idx (tools/preprocess_data.py's library call), 1 and 2 workers."""
    for workers in (1, 2):
        with tempfile.TemporaryDirectory(prefix="l3train-bench-") as scratch:
            stats = preprocess(corpus, Path(scratch) / "corpus", tokenizer, workers=workers, progress=False,
                               log=lambda _line: None)
        log(f"preprocessing {stats.documents:,} documents, {stats.tokens:,} tokens with {workers} worker(s): "
            f"{stats.tokens / stats.seconds / 1e3:,.0f}K tokens/s")


def machine() -> str:
    """CPU model, cores, OS, Python and torch: the line every benchmark report starts with."""
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")
