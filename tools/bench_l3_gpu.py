#!/usr/bin/env python
"""Benchmark the L³ row attention on a CUDA GPU: fused Triton kernel vs torch implementations.

At an allocation with cap k (default 512) where d_t is proportional to a Zipf token
frequency (clamped to 1..k) and the batch's ids are drawn from the same distribution,
times forward+backward and measures the peak memory above the inputs
(torch.cuda.max_memory_allocated) for:

- triton: `triton_row_attention_with_entropy` (each KernelConfig of a small sweep; the
  fastest one is compared),
- torch-sorted: the bucketed block-diagonal torch implementation (what
  `row_attention_with_entropy` runs without Triton),
- padded: `row_attention_padded`, every position padded to the batch's largest d_t.

Before timing, the Triton outputs, entropies and gradients are checked against fp64 math
on a smaller case (fp32 to 1e-5 with TF32 off, bf16 to 2e-2): the compiled kernels are
otherwise only tested in Triton's interpreter. A failed check is reported, the timings
still run, and the exit status is 1. Every variant plans its own batch (sort, CSR or
buckets) inside the timed region, as training does. Memory is reported as the peak above
the inputs minus the output and the gradients, which every variant must allocate.

    python tools/bench_l3_gpu.py                    # bf16, N=8192, d_in=d_emb=1024, k=512
    python tools/bench_l3_gpu.py --dtype float32 --tied --d-emb 1024
"""

from __future__ import annotations

import torch

from l3train.benchmarks.gpu import check_against_fp64, measure_all, zipf_case
from l3train.errors import CliArgumentParser, L3TrainError, run_cli


def main() -> int:
    parser = CliArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=8192, help="N, token positions per batch")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows-per-token", type=float, default=8.0, help="v / vocab before capping")
    parser.add_argument("--cap", type=int, default=512, help="k, the largest d_t")
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--d-emb", type=int, default=1024)
    parser.add_argument("--tied", action="store_true", help="keys are values (needs d_emb == d_in)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--skip-check", action="store_true", help="skip the fp64 correctness check")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise L3TrainError("tools/bench_l3_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    if args.tied and args.d_emb != args.d_in:
        raise L3TrainError(f"--tied needs --d-emb == --d-in, got {args.d_emb} and {args.d_in}")
    # fp32 inputs: IEEE products in torch and Triton alike (Triton follows this flag).
    torch.backends.cuda.matmul.allow_tf32 = False

    print(f"device: {torch.cuda.get_device_name()}")
    passed = args.skip_check or check_against_fp64(args.tied)

    case = zipf_case(args.vocab, args.positions, args.rows_per_token, args.cap, args.d_in, args.d_emb, args.tied,
                     getattr(torch, args.dtype))
    ids, bounds = case[1], case[2]
    rows = bounds[1:] - bounds[:-1]
    mean_rows = rows[ids].double().mean().item()
    print(f"N={args.positions} vocab={args.vocab} v={int(bounds[-1]):,} rows k={args.cap} d_in={args.d_in} "
          f"d_emb={args.d_emb} tied={args.tied} {args.dtype}; unique ids {ids.unique().numel()}, "
          f"mean d_t over positions {mean_rows:.0f} (k / mean = {args.cap / mean_rows:.1f})")

    results = measure_all(case, args.tied, args.iters)

    triton_names = [name for name in results if name.startswith("triton") and results[name] is not None]
    if not triton_names:
        raise L3TrainError("no Triton config could run at this size on this GPU")
    best = min(triton_names, key=lambda name: results[name][0])
    best_ms, best_mib = results[best]
    print(f"ratios against the fastest Triton config ({best}); > 1 means Triton is better:")
    for name in ("torch-sorted", "padded"):
        if results[name] is None:
            print(f"  {name:14s} skipped")
        else:
            ms, mib = results[name]
            print(f"  {name:14s} time {ms / best_ms:6.2f}x   working memory {mib / max(best_mib, 1e-6):6.2f}x")
    if not passed:
        print("the Triton kernels FAILED the fp64 check above: timings are of wrong results")
    return 0 if passed else 1


if __name__ == "__main__":
    run_cli(main)
