#!/usr/bin/env python
"""Benchmark the core library in one run, side by side (this machine is noisy: read ratios).

1. LZW codeword counting: the fast C trie against the paper's reference loop on the same
   >= 5M tokens (identical output is asserted).
2. L³ row attention forward+backward at an LZW allocation with cap k: the sorted
   block-diagonal implementation against the naive baseline that gathers every
   position's rows padded to the batch's largest d_t (the per-position loop of the
   tests is ~1000x slower still). Peak memory is the growth of the peak resident set
   of a fresh child process per variant over its state before the timed passes.

Tokens come from a Megatron indexed dataset (`--data-prefix`, e.g. the default corpus
built by launch/quickstart.sh), cycled until `--tokens` are reached.

    python tools/bench_core.py --data-prefix data/indexed/stdlib_docstrings_text_document --vocab-size 2048
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

from l3train.errors import CliArgumentParser, L3TrainError, run_cli


def load_documents(prefix: str, total_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents of an indexed dataset as (tokens, offsets), cycled to `total_tokens`.

    The EOD token that preprocessing appends to every document is dropped, as
    tools/lzw_allocate.py does."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    docs = [np.asarray(dataset[i], dtype=np.int64)[:-1] for i in range(len(dataset))]
    chosen, count = [], 0
    while count < total_tokens:
        for doc in docs:
            chosen.append(doc)
            count += len(doc)
            if count >= total_tokens:
                break
    lengths = np.array([len(d) for d in chosen])
    return np.concatenate(chosen), np.concatenate([[0], np.cumsum(lengths)])


def _best_time(fn, repeats: int):
    """(result, fastest wall time) of `repeats` calls."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def bench_lzw(tokens: np.ndarray, offsets: np.ndarray, vocab: int, repeats: int) -> None:
    from l3train.allocation.lzw import fast_lzw_counts, reference_lzw_counts

    warm = offsets[offsets <= 1000]
    fast_lzw_counts(tokens[:warm[-1]], vocab, warm)  # compile the C helper outside the timing
    fast, fast_s = _best_time(lambda: fast_lzw_counts(tokens, vocab, offsets), repeats)
    reference, reference_s = _best_time(lambda: reference_lzw_counts(tokens, vocab, offsets), repeats)
    assert fast == reference, "fast LZW differs from the reference"
    print(f"LZW on {len(tokens):,} tokens, {len(offsets) - 1:,} documents, {len(fast):,} codewords (identical); "
          f"best of {repeats}")
    print(f"  reference loop  {reference_s:8.2f} s   {len(tokens) / reference_s / 1e6:8.2f} M tok/s")
    print(f"  fast (C trie)   {fast_s:8.2f} s   {len(tokens) / fast_s / 1e6:8.2f} M tok/s")
    print(f"  speed-up        {reference_s / fast_s:8.1f}x")


def _attention_child(variant: str, rows: np.ndarray, ids: np.ndarray, d_model: int, repeats: int, queue) -> None:
    import torch

    from l3train.model import l3_attention
    from l3train.model.l3_layer import bounds_from_rows

    torch.set_num_threads(1)
    torch.manual_seed(0)
    bounds = bounds_from_rows(rows)
    keys = torch.randn(int(bounds[-1]), d_model).mul_(0.02).requires_grad_()
    x = torch.randn(len(ids), d_model, requires_grad=True)
    token_ids = torch.from_numpy(ids)
    fn = {"sorted": l3_attention.row_attention, "padded": l3_attention.row_attention_padded}[variant]
    fn(x, token_ids, bounds, keys, keys).square().sum().backward()  # warm-up: allocator, thread pools
    x.grad = keys.grad = None
    baseline_kb = _resident_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to now
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x, token_ids, bounds, keys, keys).square().sum().backward()
        times.append(time.perf_counter() - start)
        x.grad = keys.grad = None
    queue.put((min(times), max(0, _resident_kb("VmHWM") - baseline_kb) / 1024))


def _resident_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def bench_attention(rows: np.ndarray, ids: np.ndarray, d_model: int, repeats: int) -> None:
    context = mp.get_context("spawn")
    results = {}
    for variant in ("sorted", "padded"):
        queue = context.Queue()
        child = context.Process(target=_attention_child, args=(variant, rows, ids, d_model, repeats, queue))
        child.start()
        results[variant] = queue.get()
        child.join()
    batch_rows = rows[ids]
    print(f"L³ fwd+bwd: {len(ids):,} positions ({len(np.unique(ids)):,} unique ids), d={d_model}, tied, "
          f"v={rows.sum():,}, k={rows.max()}, mean d_t over positions {batch_rows.mean():.1f}, "
          f"max {batch_rows.max()}; 1 thread")
    sorted_s, sorted_mb = results["sorted"]
    for variant, (seconds, megabytes) in results.items():
        print(f"  {variant:<7} {seconds * 1e3:9.1f} ms ({seconds / sorted_s:6.2f}x sorted)   "
              f"peak +{megabytes:8.1f} MB ({megabytes / max(sorted_mb, 1e-9):6.2f}x sorted)")


def main() -> int:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-prefix", required=True, help="Megatron indexed dataset to take tokens from")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=5_000_000, help="tokens for the LZW benchmark")
    parser.add_argument("--budget", type=int, default=0, help="rows v (default: 32 × vocab)")
    parser.add_argument("--cap", type=int, default=512, help="rows per token cap k")
    parser.add_argument("--positions", type=int, default=4096, help="positions per L³ batch")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (the best is reported)")
    args = parser.parse_args()

    from l3train.allocation.allocation import lzw_allocation
    from l3train.allocation.lzw import fast_lzw_counts

    if not Path(args.data_prefix + ".idx").is_file():
        raise L3TrainError(f"--data-prefix {args.data_prefix}: no {args.data_prefix}.idx; build one with "
                           f"tools/preprocess_data.py (launch/quickstart.sh makes the default corpus's)")
    tokens, offsets = load_documents(args.data_prefix, args.tokens)
    bench_lzw(tokens, offsets, args.vocab_size, args.repeats)
    codewords = fast_lzw_counts(tokens, args.vocab_size, offsets)
    rows = lzw_allocation(codewords.counts, codewords.last_token, args.vocab_size,
                          args.budget or 32 * args.vocab_size, args.cap)
    bench_attention(rows, tokens[:args.positions].copy(), args.d_model, args.repeats)
    return 0


if __name__ == "__main__":
    run_cli(main)
