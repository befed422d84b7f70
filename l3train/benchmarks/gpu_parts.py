"""The parts of tools/gpu_check.sh, one process each (`python -m l3train.benchmarks.gpu_parts PART`).

Every figure is recorded by `Figures` the moment it exists (a part stopped at its cap keeps
what it had), and every comparison runs isolated (`Figures.check`): an exception or a
tolerance missed is one FAILED figure and the part goes on to its next figure. The part's
exit status is 1 when any check failed. l3train.benchmarks.gpu_check says what each part
covers; the sizes below are the GPU's (`FULL`), or toy sizes (`REHEARSAL`) when a CUDA part
is rehearsed on the CPU under Triton's interpreter (`--rehearse`, used by the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
WARMUP_STEPS = 3  # training steps before the host synchronisations are counted


@dataclass(frozen=True)
class Sizes:
    vocab: int
    positions: int  # the correctness cases' N
    cap: int  # k
    width: int  # d_in = d_emb
    past_2_31: bool  # whether the large-offset table really passes 2^31 elements (GPU memory)
    bench_positions: tuple[int, ...]
    iters: int
    train_steps: int
    train_repeats: int


FULL = Sizes(vocab=32000, positions=16384, cap=512, width=1024, past_2_31=True, bench_positions=(16384, 65536),
             iters=10, train_steps=40, train_repeats=2)
REHEARSAL = Sizes(vocab=300, positions=256, cap=32, width=32, past_2_31=False, bench_positions=(256,), iters=1,
                  train_steps=6, train_repeats=1)
FP32_TOLERANCE, BF16_TOLERANCE, FP64_TOLERANCE = 1e-5, 2e-2, 1e-12


class Figures:
    """A part's figures: printed, and rewritten to a JSON file after each one."""

    def __init__(self, path: Path) -> None:
        self.path, self.items = path, []

    def add(self, text: str, ok: bool | None = None, summary: bool = False, **values: Any) -> None:
        """Record one figure line; `ok` for comparisons (None: a measurement); `summary`: also in the table."""
        self.items.append({"text": text, "ok": ok, "summary": summary, **values})
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.items, indent=1))
        os.replace(tmp, self.path)
        print(("FAILED " if ok is False else "") + text, flush=True)

    def check(self, label: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), with any exception recorded as a FAILED figure for `label` (traceback to the log)."""
        try:
            return fn(*args)
        except Exception as error:  # noqa: BLE001 (isolation is the point: the part goes on)
            traceback.print_exc()
            message = (str(error).strip().splitlines() or [""])[0][:300]
            self.add(f"{label}: {type(error).__name__}: {message}", ok=False)
            _free_cuda_memory()
            return None

    @property
    def failed(self) -> bool:
        return any(item["ok"] is False for item in self.items)


@dataclass
class Context:
    work: Path
    kit: Path
    device: Any  # torch.device
    sizes: Sizes


def _free_cuda_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def data_dir(ctx: Context) -> Path:
    """The quick start's data: the kit's, else what the data part built in the work folder."""
    kit_data = ctx.kit / "data"
    return kit_data if (kit_data / "allocation" / "lzw_v32768_k128.npz").is_file() else ctx.work / "data"


# --- preflight ----------------------------------------------------------------------------------

def part_preflight(fig: Figures, ctx: Context) -> None:
    import importlib
    import shutil

    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        fig.add(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
                f"{props.major}.{props.minor}, {props.multi_processor_count} SMs", summary=True, gpu=props.name)
    else:
        fig.add("GPU: none (torch.cuda.is_available() is False): the CUDA parts are skipped", summary=True, gpu=None)
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers", "sentencepiece", "numpy", "deepspeed", "megatron.core", "pydantic"):
        try:
            module = importlib.import_module(name)
            versions[name] = getattr(module, "__version__", "?")
        except Exception as error:  # noqa: BLE001 (each missing package is one FAILED line)
            fig.add(f"import {name}: {type(error).__name__}: {error} (tools/gpu_kit.sh builds the wheels "
                    f"tools/gpu_check.sh installs; ship them with the tree)", ok=False)
    fig.add("versions: " + ", ".join(f"{key} {value}" for key, value in versions.items()), summary=True, **versions)
    compiler = shutil.which("cc") or shutil.which("gcc")
    fig.add(f"C compiler (Triton builds its launcher with it): {compiler or 'none found'}", ok=compiler is not None)
    nvcc = shutil.which("nvcc")
    if nvcc:
        release = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        fig.add(f"nvcc: {release[-1] if release else nvcc}")
    fig.check("import l3train's trainer and kernels", _import_l3train, fig)


def _import_l3train(fig: Figures) -> None:
    import l3train.model.l3_triton  # noqa: F401
    import l3train.trainer.trainer  # noqa: F401

    fig.add("l3train: the trainer (DeepSpeed, megatron-core) and the Triton kernels import", ok=True)


# --- data ---------------------------------------------------------------------------------------

def part_data(fig: Figures, ctx: Context) -> None:
    directory = data_dir(ctx)
    start = time.monotonic()
    if directory == ctx.work / "data":
        subprocess.run(["bash", "-c", 'source launch/lib.sh && build_quickstart_data "$0" "$1"', sys.executable,
                        str(directory)], cwd=REPO, check=True)
        origin = f"built in {time.monotonic() - start:.0f} s"
    else:
        origin = "from the kit"
    tokens = (directory / "indexed" / "stdlib_docstrings_text_document.bin").stat().st_size // 2
    fig.add(f"data {origin}: {directory} ({tokens:,} tokens)", summary=True)


# --- kernels ------------------------------------------------------------------------------------

def _relative_errors(got: list, want: list, names: list[str]) -> dict[str, float]:
    return {name: float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))
            for name, a, b in zip(names, got, want)}


def _report_comparison(fig: Figures, label: str, errors: dict[str, float], tolerance: float, reference: str) -> None:
    ok = max(errors.values()) <= tolerance
    fig.add(f"{label:34s} vs {reference} (tolerance {tolerance:.0e}): {'ok' if ok else 'FAILED'} "
            + " ".join(f"{key} {value:.1e}" for key, value in errors.items()), ok=ok, errors=errors)


def _compare_unit_case(fig: Figures, ctx: Context, name: str, case_spec: tuple) -> None:
    """One case of tests/unit/test_l3_triton.py, compiled, against the per-token loop in fp64."""
    import test_l3_triton as cases
    import torch

    from l3train.model.l3_attention import row_attention_loop
    from l3train.model.l3_triton import KernelConfig, triton_row_attention_with_entropy

    tied, d_in, d_emb, dtype_name, overrides = case_spec
    dtype = getattr(torch, dtype_name)
    case = cases.make_case(tied, d_in, d_emb, dtype)
    config = KernelConfig(**overrides)
    device_case = [t.to(ctx.device) for t in case]
    wide = [t.double() if t.is_floating_point() else t for t in case]
    got = cases.outputs_and_grads(lambda *a: triton_row_attention_with_entropy(*a, config=config)[0],
                                  *device_case, tied)
    want = cases.outputs_and_grads(row_attention_loop, *wide, tied)
    errors = {key: cases.relative_error(got[key].cpu(), want[key]) for key in want}
    entropy = triton_row_attention_with_entropy(*device_case[:5], config=config)[1]
    errors["entropy"] = cases.relative_error(entropy.cpu(), cases.reference_entropy(*case[:4]))
    tolerance = {"float64": FP64_TOLERANCE, "bfloat16": BF16_TOLERANCE}.get(dtype_name, FP32_TOLERANCE)
    _report_comparison(fig, f"unit case {name} {dtype_name}", errors, tolerance, "loop fp64")


def _compare_zipf(fig: Figures, ctx: Context, tied: bool, dtype_name: str) -> None:
    """Zipf ids at realistic sizes against the sorted torch path in fp64 (itself checked against
    the per-token loop by the unit tests), on the same device."""
    import torch

    from l3train.benchmarks.gpu import outputs_and_grads, zipf_case
    from l3train.model.l3_attention import _SortedRowAttention, plan_blocks
    from l3train.model.l3_triton import triton_row_attention_with_entropy

    s = ctx.sizes
    case = zipf_case(s.vocab, s.positions, 8.0, s.cap, s.width, s.width, tied, getattr(torch, dtype_name),
                     device=str(ctx.device))
    wide = tuple(t.double() if t.is_floating_point() else t for t in case)

    def reference(x, ids, bounds, keys, values):
        return _SortedRowAttention.apply(x, keys, values, plan_blocks(ids, bounds, feature_width=2 * s.width))

    names = ["out", "grad_x", "grad_keys"] + ([] if tied else ["grad_values"])
    got = outputs_and_grads(lambda *a: triton_row_attention_with_entropy(*a)[0], case, tied)
    want = outputs_and_grads(lambda *a: reference(*a)[0], wide, tied)
    got.append(triton_row_attention_with_entropy(*case[:5])[1])
    want.append(reference(*wide[:5])[1])
    errors = _relative_errors(got, want, names + ["entropy"])
    tolerance = BF16_TOLERANCE if dtype_name == "bfloat16" else FP32_TOLERANCE
    label = f"Zipf V={s.vocab} N={s.positions} k={s.cap} d={s.width} {'tied' if tied else 'untied'} {dtype_name}"
    _report_comparison(fig, label, errors, tolerance, "sorted fp64")


def _compare_past_2_31(fig: Figures, ctx: Context) -> None:
    """Tokens whose rows start past 2^31 / d rows: every row offset times the width exceeds
    2^31 (int32 address arithmetic would wrap). bf16 tables of 2.1M × 1024; compared on the
    tokens' own rows, re-based, against the sorted path in fp64; the rows before them must
    keep a zero gradient."""
    import torch

    from l3train.benchmarks.gpu import outputs_and_grads
    from l3train.model.l3_attention import _SortedRowAttention, plan_blocks
    from l3train.model.l3_triton import triton_row_attention_with_entropy

    width = ctx.sizes.width
    skipped = (2**31 // width + 1) if ctx.sizes.past_2_31 else 1000  # rows of token 0, never looked up
    tokens, rows_each, positions = 64, 64, 2048
    device, dtype = ctx.device, torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(3)
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), skipped + rows_each * torch.arange(tokens + 1)]).to(device)
    table_rows = int(bounds[-1])
    keys = (torch.randn(table_rows, width, generator=generator, device=device) * width ** -0.5).to(dtype)
    values = torch.randn(table_rows, width, generator=generator, device=device).to(dtype)
    ids = torch.randint(1, tokens + 1, (positions,), generator=generator, device=device)
    x = torch.randn(positions, width, generator=generator, device=device).to(dtype)
    grad_out = torch.randn(positions, width, generator=generator, device=device).to(dtype)
    got = outputs_and_grads(lambda *a: triton_row_attention_with_entropy(*a)[0],
                            (x, ids, bounds, keys, values, grad_out), tied=False)
    untouched = float(got[2][:skipped].abs().max()) + float(got[3][:skipped].abs().max())
    got = [got[0], got[1], got[2][skipped:], got[3][skipped:]]
    del keys, values
    _free_cuda_memory()
    local = (x.double(), ids - 1, bounds[1:] - skipped, None, None, grad_out.double())
    generator.manual_seed(3)  # the same tables again, only the rows looked up, in fp64
    keys = (torch.randn(table_rows, width, generator=generator, device=device) * width ** -0.5).to(dtype)
    local_keys = keys[skipped:].double()
    del keys
    values = torch.randn(table_rows, width, generator=generator, device=device).to(dtype)
    local_values = values[skipped:].double()
    del values
    local = (local[0], local[1], local[2], local_keys, local_values, local[5])
    want = outputs_and_grads(lambda x, ids, bounds, k, v: _SortedRowAttention.apply(
        x, k, v, plan_blocks(ids, bounds, feature_width=2 * width))[0], local, tied=False)
    errors = _relative_errors(got, want, ["out", "grad_x", "grad_keys", "grad_values"])
    largest = (table_rows - 1) * width
    label = f"offsets up to {largest / 2**31:.2f}x2^31 bf16"
    _report_comparison(fig, label, errors, BF16_TOLERANCE, "sorted fp64")
    fig.add(f"{label}: gradient of the {skipped:,} rows no position looks up: max |g| {untouched:.1e}",
            ok=untouched == 0.0)


def _gradcheck(fig: Figures, ctx: Context) -> None:
    import torch

    from l3train.model.l3_triton import triton_row_attention_with_entropy

    generator = torch.Generator().manual_seed(1)
    bounds = torch.tensor([0, 1, 4, 6, 10], device=ctx.device)
    ids = torch.tensor([1, 3, 1, 0, 3, 2, 1], device=ctx.device)
    x, keys = (torch.randn(n, 3, generator=generator, dtype=torch.float64).to(ctx.device).requires_grad_()
               for n in (7, 10))
    values = torch.randn(10, 2, generator=generator, dtype=torch.float64).to(ctx.device).requires_grad_()
    ok = torch.autograd.gradcheck(lambda *a: triton_row_attention_with_entropy(a[0], ids, bounds, *a[1:])[0],
                                  (x, keys, values))
    fig.add(f"gradcheck fp64: {'ok' if ok else 'FAILED'}", ok=bool(ok))


def part_kernels(fig: Figures, ctx: Context) -> None:
    import torch

    sys.path.insert(0, str(REPO / "tests" / "unit"))
    import test_l3_triton as cases

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 inputs: IEEE products, as the tolerances assume
    # Realistic sizes first (each new dtype or tile shape costs a compilation); the fp64 case
    # (tl.dot at fp64, which no CPU test compiles) and gradcheck last.
    for dtype_name in ("float32", "bfloat16"):
        for tied in (False, True):
            fig.check(f"Zipf {'tied' if tied else 'untied'} {dtype_name}", _compare_zipf, fig, ctx, tied, dtype_name)
            _free_cuda_memory()
    fig.check("offsets past 2^31", _compare_past_2_31, fig, ctx)
    _free_cuda_memory()
    specs = [(name, spec) for name, spec in cases.CASES.items() if spec[3] != "float64"]
    specs += [(f"{name}_bf16", (tied, d_in, d_emb, "bfloat16", {})) for name, (tied, d_in, d_emb, dtype, _)
              in cases.CASES.items() if name in ("untied_wide", "tied_wide")]
    specs += [(name, spec) for name, spec in cases.CASES.items() if spec[3] == "float64"]
    for name, spec in specs:
        fig.check(f"unit case {name}", _compare_unit_case, fig, ctx, name, spec)
    fig.check("gradcheck fp64", _gradcheck, fig, ctx)


# --- benchmark ----------------------------------------------------------------------------------

def milliseconds(fn: Callable[[], Any], iters: int) -> float:
    """Mean milliseconds per call after two warm-up calls (CUDA events on a GPU)."""
    import torch

    for _ in range(2):
        fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1e3 / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _dense_tflops(flops: float, iters: int, device: Any) -> float:
    """TFLOP/s of one square bf16 matmul doing `flops` (rounded to a multiple of 64 wide)."""
    import torch

    side = max(64, round((flops / 2) ** (1 / 3) / 64) * 64)
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    b = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    return 2 * side ** 3 / milliseconds(lambda: a @ b, iters) / 1e9


def _bench_case(fig: Figures, ctx: Context, positions: int, dtype_name: str, tied: bool) -> None:
    """Plan, forward, dX and dK/dV apart (the kernels with a prebuilt plan); what training runs
    per call (plan + forward + backward); the torch path, planned with training's feature width,
    with TF32 off and on; useful TFLOP/s against a dense bf16 matmul of equal FLOPs."""
    import torch

    from l3train.benchmarks.gpu import zipf_case
    from l3train.model.l3_attention import _SortedRowAttention, plan_blocks
    from l3train.model.l3_triton import plan_triton, triton_attend

    s = ctx.sizes
    x, ids, bounds, keys, values, grad_out = zipf_case(s.vocab, positions, 8.0, s.cap, s.width, s.width, tied,
                                                       getattr(torch, dtype_name), device=str(ctx.device))
    d_in, d_emb = keys.shape[1], values.shape[1]
    scored_rows = int((bounds[1:] - bounds[:-1])[ids].sum())  # Σ over positions of d_t
    forward_flops = 2 * scored_rows * (d_in + d_emb)  # scores and the weighted sum of values
    useful_flops = 3 * forward_flops  # forward, and the backward's two products per forward product

    def inputs(x_grad: bool, table_grad: bool) -> tuple:
        k = keys.detach().requires_grad_(table_grad)
        return x.detach().requires_grad_(x_grad), k, k if tied else values.detach().requires_grad_(table_grad)

    plan = plan_triton(ids, bounds)
    times = {"plan": milliseconds(lambda: plan_triton(ids, bounds), s.iters)}
    with torch.no_grad():
        times["forward"] = milliseconds(lambda: triton_attend(*inputs(False, False), plan), s.iters)
    for name, x_grad in (("dX", True), ("dK/dV", False)):
        xi, ki, vi = inputs(x_grad, not x_grad)
        out = triton_attend(xi, ki, vi, plan)[0]
        wanted = [xi] if x_grad else ([ki] if tied else [ki, vi])
        times[name] = milliseconds(lambda out=out, wanted=wanted: torch.autograd.grad(out, wanted, grad_out,
                                                                                     retain_graph=True), s.iters)

    def training_call(attend: Callable) -> Callable[[], Any]:
        def call() -> None:
            xi, ki, vi = inputs(True, True)
            wanted = [xi, ki] if tied else [xi, ki, vi]
            torch.autograd.grad(attend(xi, ki, vi), wanted, grad_out)
        return call

    times["Triton plan+fwd+bwd"] = milliseconds(training_call(
        lambda xi, ki, vi: triton_attend(xi, ki, vi, plan_triton(ids, bounds))[0]), s.iters)
    sorted_call = training_call(lambda xi, ki, vi: _SortedRowAttention.apply(
        xi, ki, vi, plan_blocks(ids, bounds, feature_width=d_in + d_emb))[0])
    for tf32 in ((False, True) if dtype_name == "float32" else (False,)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        times[f"torch{' TF32' if tf32 else ''} plan+fwd+bwd"] = milliseconds(sorted_call, s.iters)
    torch.backends.cuda.matmul.allow_tf32 = False
    tflops = useful_flops / times["Triton plan+fwd+bwd"] / 1e9
    dense = _dense_tflops(useful_flops, s.iters, ctx.device)
    label = f"N={positions} {dtype_name} {'tied' if tied else 'untied'}"
    fig.add(f"{label}: ms " + ", ".join(f"{key} {value:.2f}" for key, value in times.items())
            + f"; useful {tflops:.3g} TFLOP/s = {tflops / dense:.3g}x a bf16 matmul of equal FLOPs ({dense:.3g})",
            summary=(positions == s.bench_positions[0] and dtype_name == "bfloat16" and not tied),
            ms=times, useful_tflops=tflops, dense_bf16_tflops=dense, mean_rows=scored_rows / positions)


def _tile_sweep(fig: Figures, ctx: Context) -> None:
    """plan+forward+backward of each KernelConfig of l3train.benchmarks.gpu.SWEEP, bf16 untied."""
    import torch

    from l3train.benchmarks.gpu import SWEEP, outputs_and_grads, zipf_case
    from l3train.model.l3_triton import KernelConfig, triton_row_attention_with_entropy

    s = ctx.sizes
    case = zipf_case(s.vocab, s.bench_positions[0], 8.0, s.cap, s.width, s.width, False, torch.bfloat16,
                     device=str(ctx.device))
    results = {}
    for positions, rows, features, warps in SWEEP:
        config = KernelConfig(positions, rows, features, warps)
        name = f"P{positions} R{rows} F{features} w{warps}"
        results[name] = fig.check(f"tile sweep {name}", milliseconds, lambda config=config: outputs_and_grads(
            lambda *a: triton_row_attention_with_entropy(*a, config=config)[0], case, False), s.iters)
    fig.add(f"tile sweep N={s.bench_positions[0]} bf16 untied, ms plan+fwd+bwd (first = default): "
            + ", ".join(f"{name} {ms:.2f}" if ms is not None else f"{name} failed" for name, ms in results.items()),
            sweep_ms=results)


def part_benchmark(fig: Figures, ctx: Context) -> None:
    first, *more = ctx.sizes.bench_positions
    for dtype_name in ("bfloat16", "float32"):
        for tied in (False, True):
            fig.check(f"benchmark N={first} {dtype_name} {'tied' if tied else 'untied'}", _bench_case, fig, ctx,
                      first, dtype_name, tied)
            _free_cuda_memory()
    for positions in more:
        for dtype_name in ("bfloat16", "float32"):
            fig.check(f"benchmark N={positions} {dtype_name} untied", _bench_case, fig, ctx, positions, dtype_name,
                      False)
            _free_cuda_memory()
    fig.check("tile sweep", _tile_sweep, fig, ctx)  # last: every config is a new compilation


# --- train --------------------------------------------------------------------------------------

def _data_overrides(directory: Path, l3: bool) -> list[str]:
    overrides = [f"data.prefixes=[{directory / 'indexed' / 'stdlib_docstrings_text_document'}]",
                 f"data.tokenizer={directory / 'tokenizer' / 'spm_bpe_2048.model'}"]
    return overrides + ([f"l3.allocation={directory / 'allocation' / 'lzw_v32768_k128.npz'}"] if l3 else [])


def l3_run_dir(ctx: Context) -> Path:
    """The first timed L³ run of the train part (the inference part generates from its checkpoint)."""
    return ctx.work / "train" / "l3_1"


def part_train(fig: Figures, ctx: Context) -> None:
    import torch

    from l3train.benchmarks.training import run_trainer, tokens_per_second

    s, directory = ctx.sizes, data_dir(ctx)
    common = ["training.precision=bf16", "parallel.zero_stage=2", f"training.steps={s.train_steps}",
              "training.log_interval=1", f"training.eval_interval={s.train_steps}", "optimizer.warmup_steps=1"]
    models = {"l3": ("configs/tiny_l3.yaml", _data_overrides(directory, True)),
              "dense": ("configs/tiny_dense.yaml", _data_overrides(directory, False))}
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(1, s.train_repeats + 1):  # interleaved: a slow phase hits both models
        for name, (config, overrides) in models.items():
            run_dir = ctx.work / "train" / f"{name}_{repeat}"
            if fig.check(f"train {name} repetition {repeat}", run_trainer, config, 1, run_dir,
                         [*common, *overrides]):
                speeds[name].append(tokens_per_second(run_dir))
                fig.add(f"{config} bf16 ZeRO-2, repetition {repeat}: {speeds[name][-1]:,.0f} tokens/s")
    if all(speeds.values()):
        l3, dense = statistics.median(speeds["l3"]), statistics.median(speeds["dense"])
        fig.add(f"tokens/s L3 {l3:,.0f}, dense {dense:,.0f}: L3/dense {l3 / dense:.2f}x (paper's anchor 0.87x; "
                f"medians of {s.train_repeats} interleaved repetition(s), steps after {WARMUP_STEPS})",
                summary=True, l3_tokens_per_s=l3, dense_tokens_per_s=dense, ratio=l3 / dense)
    if torch.cuda.is_available() or ctx.sizes is REHEARSAL:  # rehearsed: the same run, nothing to count
        fig.check("host synchronisations", _count_model_syncs, fig, ctx, models["l3"], common)
    else:
        fig.add("host synchronisations: not counted (torch.cuda.set_sync_debug_mode needs CUDA)")


def _count_model_syncs(fig: Figures, ctx: Context, model: tuple[str, list[str]], common: list[str]) -> None:
    """A short L³ run under `sync-train`: syncs per step after warm-up, by the l3train/model line causing them."""
    config, overrides = model
    report = ctx.work / "syncs.json"
    steps = WARMUP_STEPS + 4
    command = [sys.executable, "-m", "l3train.benchmarks.gpu_parts", "sync-train", "--report", str(report), "--",
               "--config", config, f"run_dir={ctx.work / 'train' / 'syncs'}", *common, *overrides,
               f"training.steps={steps}", f"training.eval_interval={steps + 1}", f"checkpoint.save_interval={steps + 1}"]
    subprocess.run(command, cwd=REPO, check=True)
    counted = json.loads(report.read_text())
    per_step = sum(counted["sites"].values()) / max(counted["steps"], 1)
    fig.add(f"host syncs per step inside l3train/model after {WARMUP_STEPS} warm-up steps: {per_step:g} "
            f"({counted['steps']} steps counted{'' if counted['cuda'] else '; no CUDA: none can be seen'})",
            summary=True, syncs=counted)
    for site, count in sorted(counted["sites"].items()):
        fig.add(f"  {site}: {count / max(counted['steps'], 1):g} per step")


def sync_train(report: Path, trainer_args: list[str]) -> None:
    """`python -m l3train.train TRAINER_ARGS` with CUDA sync debugging from step WARMUP_STEPS on:
    each synchronising call whose Python stack passes through l3train/model is counted by its
    innermost line there; others (logging, DeepSpeed) are ignored. Rewrites `report` after every step."""
    import torch

    import l3train.trainer.trainer as trainer_module

    sites: Counter[str] = Counter()
    steps = 0
    original_step = trainer_module.Trainer.train_step

    cuda = torch.cuda.is_available()

    def train_step(self, batch):
        nonlocal steps
        counted = self.step >= WARMUP_STEPS
        steps += counted
        if cuda and counted:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            return original_step(self, batch)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
            # After every step: the trainer ends its process without finalizers (exit_process).
            report.write_text(json.dumps({"steps": steps, "sites": dict(sites), "cuda": cuda}))

    original_show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" not in str(message):
            return original_show(message, category, filename, lineno, file, line)
        frames = [frame for frame in traceback.extract_stack() if "/l3train/model/" in frame.filename]
        if frames:
            frame = frames[-1]
            sites[f"{frame.filename.split('/l3train/', 1)[1]}:{frame.lineno} ({frame.name})"] += 1

    trainer_module.Trainer.train_step = train_step
    warnings.showwarning = showwarning
    warnings.filterwarnings("always", message=".*synchronizing CUDA operation.*")
    sys.argv = ["l3train.train", *trainer_args]
    runpy.run_module("l3train.train", run_name="__main__", alter_sys=True)


# --- sharded ------------------------------------------------------------------------------------

def part_sharded(fig: Figures, ctx: Context) -> None:
    """tests/integration/test_bf16_accumulation.py's worker as a world of one (NCCL on a GPU)."""
    import torch

    from l3train.distributed import free_port

    report = ctx.work / "bf16_accumulation.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr",
                             "127.0.0.1", "--master_port", str(free_port()),
                             "tests/integration/test_bf16_accumulation.py", str(report)],
                            cwd=REPO, env=env, capture_output=True, text=True)
    print(result.stdout + result.stderr)
    for line in result.stdout.splitlines():
        if line.startswith(("[bf16 accumulation]", "dense ", "rows ", "clipping ")):
            fig.add(line)
    if result.returncode:
        fig.add(f"the worker exited with status {result.returncode}", ok=False)
        return
    ran = json.loads(report.read_text())
    expected = ("cuda", "nccl") if torch.cuda.is_available() else ("cpu", "gloo")
    fig.add(f"the sharded rows ran on {ran['device']} over {ran['backend']}",
            ok=(ran["device"], ran["backend"]) == expected, summary=True)


# --- inference ----------------------------------------------------------------------------------

def _placement_logits(ctx: Context, reader: Any, placement: str, prompts: list[list[int]]) -> Any:
    import torch

    from l3train.inference.config import InferenceConfig
    from l3train.inference.engine import Generator
    from l3train.inference.loading import load_for_generation

    model, tables = load_for_generation(reader, InferenceConfig(placement=placement,
                                                                table_dir=str(ctx.work / "tables")), ctx.device)
    try:
        steps = Generator(model, tables).generate(prompts, InferenceConfig(max_new_tokens=8, temperature=0)).steps
        pinned = None
        if tables.backends:
            stager = tables.backends[0].stager
            source = getattr(stager.tables[0], "table", None)
            pinned = {"table": None if source is None else source.is_pinned(),
                      "staging": getattr(stager.transfer, "host", [None])[0] is not None
                      and stager.transfer.host[0].is_pinned()}
        return torch.stack([step.logits for step in steps]), pinned
    finally:
        tables.close()


def part_inference(fig: Figures, ctx: Context) -> None:
    from l3train.benchmarks.inference import bench_prompts, bench_speed
    from l3train.checkpoint.reader import open_checkpoint

    checkpoint = l3_run_dir(ctx)
    reader = open_checkpoint(checkpoint)
    prompts = bench_prompts(4, reader.config.model.vocab_size)
    results = {placement: fig.check(f"generate with {placement} tables", _placement_logits, ctx, reader, placement,
                                    prompts) for placement in ("resident", "host", "disk")}
    resident = results["resident"]
    for placement in ("host", "disk"):
        if resident is None or results[placement] is None:
            continue
        logits, pinned = results[placement]
        equal = bool((logits == resident[0]).all()) and logits.shape == resident[0].shape
        difference = float((logits - resident[0]).abs().max())
        fig.add(f"{placement} logits vs resident over 8 greedy steps of 4 prompts: "
                f"{'equal' if equal else f'NOT equal (max difference {difference:.1e})'}", ok=equal,
                summary=placement == "disk")
        if placement == "host" and ctx.device.type == "cuda":
            fig.add(f"host placement: table pinned {pinned['table']}, staging buffer pinned {pinned['staging']}",
                    ok=pinned == {"table": False, "staging": True})
    rows = fig.check("decode speed", bench_speed, checkpoint, ctx.work / "tables", [1, 16], 3, 16,
                     lambda line: print(line, flush=True), ctx.device) or []
    for batch in (1, 16):
        speeds = {row["variant"]: row["tokens_per_s"] for row in rows if row["batch"] == batch}
        if speeds:
            fig.add(f"decode batch {batch:>2} tokens/s: " + ", ".join(f"{name} {value:,.0f}"
                                                                      for name, value in speeds.items()),
                    summary=batch == 16, tokens_per_s=speeds)


PART_FUNCTIONS: dict[str, Callable[[Figures, Context], None]] = {
    "preflight": part_preflight, "data": part_data, "kernels": part_kernels, "benchmark": part_benchmark,
    "train": part_train, "sharded": part_sharded, "inference": part_inference,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sync-train"]:
        parser = argparse.ArgumentParser(prog="gpu_parts sync-train")
        parser.add_argument("--report", required=True, type=Path)
        args, trainer_args = parser.parse_known_args(argv[1:])
        sync_train(args.report, [arg for arg in trainer_args if arg != "--"])
        return 0
    parser = argparse.ArgumentParser(prog="python -m l3train.benchmarks.gpu_parts")
    parser.add_argument("part", choices=list(PART_FUNCTIONS))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--kit", type=Path, required=True)
    parser.add_argument("--figures", type=Path, required=True)
    parser.add_argument("--rehearse", action="store_true",
                        help="toy sizes; without CUDA, Triton's interpreter (set TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = Context(args.work, args.kit, device, REHEARSAL if args.rehearse else FULL)
    args.work.mkdir(parents=True, exist_ok=True)
    figures = Figures(args.figures)
    os.chdir(REPO)
    PART_FUNCTIONS[args.part](figures, ctx)
    return 1 if figures.failed else 0


if __name__ == "__main__":
    sys.exit(main())
