"""CUDA benchmark of the L³ row attention: the fused Triton kernel against the torch paths.

Run by tools/bench_l3_gpu.py. Cases have d_t proportional to a Zipf token frequency
(clamped to 1..k) and ids drawn from the same distribution. Every variant plans its own
batch (sort, CSR or buckets) inside the timed region, as training does. Memory is the peak
above the inputs minus the output and the gradients, which every variant must allocate.
The compiled kernels are otherwise only tested in Triton's interpreter, so
`check_against_fp64` compares them with fp64 math first. Lines are reported through
`log` (default: print).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from triton.runtime.errors import OutOfResources

AttentionFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

SWEEP = [  # (positions, rows, features, num_warps); the first is the default KernelConfig
    (32, 32, 32, 8),
    (32, 32, 64, 8),
    (64, 32, 32, 8),
    (32, 64, 32, 8),
    (64, 64, 32, 8),
    (16, 32, 64, 8),
]


def zipf_case(vocab: int, positions: int, rows_per_token: float, cap: int, d_in: int, d_emb: int, tied: bool,
              dtype: torch.dtype, seed: int = 0, device: str = "cuda") -> tuple[Tensor, ...]:
    """(x, ids, bounds, keys, values, grad_out); d_t ∝ Zipf frequency, clamped to [1, cap]."""
    from l3train.model.l3_layer import bounds_from_rows

    gen = torch.Generator().manual_seed(seed)
    frequency = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    frequency /= frequency.sum()
    rows = (frequency * rows_per_token * vocab).round().clamp(1, cap).long()
    bounds = bounds_from_rows(rows)
    ids = torch.multinomial(frequency, positions, replacement=True, generator=gen)
    scale = d_in ** -0.5  # keep scores O(1) so the softmax is neither flat nor one-hot
    keys = torch.randn(int(bounds[-1]), d_in, generator=gen) * scale
    values = keys if tied else torch.randn(int(bounds[-1]), d_emb, generator=gen)
    x = torch.randn(positions, d_in, generator=gen)
    grad_out = torch.randn(positions, d_emb, generator=gen)
    return tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device)
                 for t in (x, ids, bounds, keys, values, grad_out))


def implementations(sweep: list[tuple[int, int, int, int]]) -> dict[str, AttentionFn]:
    from l3train.model.l3_attention import _SortedRowAttention, plan_blocks, row_attention_padded
    from l3train.model.l3_triton import KernelConfig, triton_row_attention_with_entropy

    def triton_fn(config: KernelConfig) -> AttentionFn:
        return lambda x, ids, bounds, keys, values: triton_row_attention_with_entropy(
            x, ids, bounds, keys, values, config=config)[0]

    fns = {f"triton P{p} R{r} F{f} w{w}": triton_fn(KernelConfig(p, r, f, w)) for p, r, f, w in sweep}
    # The torch path directly: on CUDA `row_attention_with_entropy` dispatches to Triton.
    fns["torch-sorted"] = lambda x, ids, bounds, keys, values: _SortedRowAttention.apply(
        x, keys, values, plan_blocks(ids, bounds, feature_width=x.shape[1] + values.shape[1]))[0]
    fns["padded"] = row_attention_padded
    return fns


def outputs_and_grads(fn: AttentionFn, case: tuple[Tensor, ...], tied: bool) -> list[Tensor]:
    x, ids, bounds, keys, values, grad_out = case
    x = x.detach().requires_grad_()
    keys = keys.detach().requires_grad_()
    values = keys if tied else values.detach().requires_grad_()
    inputs = [x, keys] if tied else [x, keys, values]
    out = fn(x, ids, bounds, keys, values)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]


def check_against_fp64(tied: bool, log: Callable[[str], None] = print) -> bool:
    """Compiled Triton vs the torch implementation in fp64 on a mid-sized case; True if all agree."""
    from l3train.model.l3_attention import _SortedRowAttention, plan_blocks
    from l3train.model.l3_triton import triton_row_attention_with_entropy

    def sorted_with_entropy(x, ids, bounds, keys, values):
        plan = plan_blocks(ids, bounds, feature_width=x.shape[1] + values.shape[1])  # as training plans
        return _SortedRowAttention.apply(x, keys, values, plan)

    names = ["out", "grad_x", "grad_keys"] + ([] if tied else ["grad_values"])
    passed = True
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        case = zipf_case(vocab=500, positions=3000, rows_per_token=8, cap=512, d_in=96, d_emb=96 if tied else 80,
                         tied=tied, dtype=dtype, seed=1)
        wide = tuple(t.double() if t.is_floating_point() else t for t in case)
        got = outputs_and_grads(lambda *a: triton_row_attention_with_entropy(*a)[0], case, tied)
        want = outputs_and_grads(lambda *a: sorted_with_entropy(*a)[0], wide, tied)
        got.append(triton_row_attention_with_entropy(*case[:5])[1])
        want.append(sorted_with_entropy(*wide[:5])[1])
        errors = {name: ((a.double() - b).abs().max() / b.abs().max()).item()
                  for name, a, b in zip(names + ["entropy"], got, want)}
        ok = max(errors.values()) <= tolerance
        passed &= ok
        log(f"check {str(dtype):15s} vs fp64 (tolerance {tolerance:.0e}): {'ok' if ok else 'FAILED'} "
            + " ".join(f"{name} {error:.1e}" for name, error in errors.items()))
    return passed


def measure(fn: AttentionFn, case: tuple[Tensor, ...], tied: bool, iters: int) -> tuple[float, float]:
    """(milliseconds per forward+backward, peak working MiB beyond inputs, output and gradients)."""
    for _ in range(2):  # compile / warm caches outside the measurement
        outputs_and_grads(fn, case, tied)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    results = outputs_and_grads(fn, case, tied)
    torch.cuda.synchronize()
    unavoidable = sum(t.numel() * t.element_size() for t in results)
    peak_mib = (torch.cuda.max_memory_allocated() - base - unavoidable) / 2**20
    del results
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        outputs_and_grads(fn, case, tied)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, peak_mib


def measure_all(case: tuple[Tensor, ...], tied: bool, iters: int,
                log: Callable[[str], None] = print) -> dict[str, tuple[float, float] | None]:
    """`measure` of every implementation (the Triton sweep first); None for those too big
    for this GPU, which are reported and skipped."""
    results: dict[str, tuple[float, float] | None] = {}
    for name, fn in implementations(SWEEP).items():
        try:
            results[name] = measure(fn, case, tied, iters)
            line = f"{results[name][0]:9.2f} ms  {results[name][1]:10.0f} MiB working memory"
        except (torch.cuda.OutOfMemoryError, OutOfResources) as error:  # too big for this GPU: report, go on
            results[name] = None
            line = f"skipped: {type(error).__name__}"
            torch.cuda.empty_cache()
        log(f"  {name:24s} {line}")
    return results
