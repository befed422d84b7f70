#!/usr/bin/env bash
# The GPU paths of l3train, checked on one GPU in a few minutes (about 5 on an H100-class
# GPU; budget 8), as one prepared script.
#
#   tools/gpu_check.sh [-- PYTEST_ARGS...]
#
# Parts, in order; each prints its figures, then one summary line per part at the end:
#   kernels    compiled Triton kernels against fp64: outputs, entropies and gradients, tied and
#              untied, fp32 (TF32 off) and bf16, on the cases of tests/unit/test_l3_triton.py
#              (narrow features, small tiles, wide rows, fp64) and on the mid-sized Zipf case
#              of l3train/benchmarks/gpu.py; gradcheck in fp64
#   benchmark  the kernel at 4K and 64K positions (k = 512, d = 1024, bf16 and fp32, tied and
#              untied): forward, dX and dK/dV timed apart, forward+backward, and the torch path
#   data       a tiny corpus, tokenizer, dataset and LZW allocation (as the test suite's)
#   train      the tiny L³ model in bf16 for 12 steps at ZeRO-2 and ZeRO-3 on one GPU, with
#              torch.cuda.set_sync_debug_mode("warn"): the host synchronisations are listed
#   sharded    tests/integration/test_bf16_accumulation.py as a world of one (NCCL on a GPU):
#              the sharded L³ rows' routing and fp32 gradients, fp32 accumulation of bf16
#              gradients at ZeRO 2 and 3, and global clipping of dense and sharded gradients
#   inference  generation with the L³ tables resident on the GPU, in pinned host memory and on
#              disk, prefetched on a side stream (tools/bench_inference.py --device cuda,
#              a short run): tokens/s side by side at batch 1 and 16, and the staging counters
#   suite      the CPU test suite with GPUs hidden: a subset that fits the budget (below),
#              or the pytest arguments given after --
#
# Parts that need CUDA (kernels, benchmark, inference) print why they are skipped on a machine without
# one; the others run on the CPU there (train without sync debugging, sharded over gloo).
# Exit status: 0 when every part that ran passed, 1 otherwise, 2 for a usage error.
# Environment: L3TRAIN_PYTHON (default: the repository's .venv, else python3).

set -uo pipefail

# The suite subset: the tests of the device decision and of what runs differently where a GPU
# exists (DeepSpeed engines at ZeRO 0-3, the Triton interpreter in a child, gloo workers of
# the sharded rows), with GPUs hidden. The sharded part above already runs
# test_bf16_accumulation.py's worker. About 3 minutes on 16 cores.
SUITE=(tests/unit/test_distributed.py tests/unit/test_l3_triton.py tests/unit/test_l3_layer.py
       tests/unit/test_config_validation.py tests/integration/test_deepspeed_adapter.py
       tests/integration/test_sharded_l3.py)

usage() {
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"
  echo "The default suite subset: ${SUITE[*]}"
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  --) shift; [ $# -eq 0 ] || SUITE=("$@") ;;
  "") ;;
  *) echo "error: unknown argument '$1' (usage: tools/gpu_check.sh [-- PYTEST_ARGS...]; see --help)" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ -n "${L3TRAIN_PYTHON:-}" ]; then
  PY=$L3TRAIN_PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY=$ROOT/.venv/bin/python
else
  PY=python3
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/l3train-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}  # the test harness and workers
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/l3train/torch_extensions}
export L3TRAIN_DATASET_CACHE=$WORK/dataset_cache
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)') \
  || { echo "error: $PY cannot import torch (see above)" >&2; exit 2; }
"$PY" -c 'import torch; print(f"[gpu_check] torch {torch.__version__}, CUDA {torch.version.cuda}, " + (
    f"{torch.cuda.device_count()} GPU(s), using {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
    else "no CUDA device: the CUDA-only parts are skipped"))'

SUMMARY=()
FAILED=0
# run_part NAME cuda|any TIMEOUT COMMAND...: run COMMAND (its stdin is the caller's) and
# record ok / FAILED / skipped with its time. TIMEOUT only guards against a hang.
run_part() {
  local name=$1 needs=$2 limit=$3 status=0 start=$SECONDS
  shift 3
  echo
  echo "=== $name"
  if [ "$needs" = cuda ] && [ "$GPUS" -eq 0 ]; then
    echo "skipped: needs a CUDA GPU (torch.cuda.is_available() is False on this machine)"
    SUMMARY+=("$(printf '%-10s skipped: no CUDA GPU' "$name")")
    return 0
  fi
  timeout "$limit" "$@" || status=$?
  local took=$((SECONDS - start))
  if [ "$status" -eq 0 ]; then
    SUMMARY+=("$(printf '%-10s ok (%d s)' "$name" "$took")")
  else
    [ "$status" -ne 124 ] || echo "timed out after $limit s"
    SUMMARY+=("$(printf '%-10s FAILED (status %d, %d s)' "$name" "$status" "$took")")
    FAILED=1
  fi
}

run_part kernels cuda 300 "$PY" - <<'PY'
"""Compiled kernels against fp64 math (the tests run them in Triton's interpreter only)."""
import sys

import torch

sys.path.insert(0, "tests/unit")
import test_l3_triton as cases  # noqa: E402

from l3train.benchmarks.gpu import check_against_fp64  # noqa: E402
from l3train.model.l3_attention import row_attention_loop  # noqa: E402
from l3train.model.l3_triton import KernelConfig, triton_row_attention_with_entropy  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False  # fp32 inputs: IEEE products, as the tolerances assume
passed = True


def compare(name, case, tied, config, tolerance):
    global passed
    gpu = [t.cuda() for t in case]
    wide = [t.double() if t.is_floating_point() else t for t in case]
    got = cases.outputs_and_grads(lambda *a: triton_row_attention_with_entropy(*a, config=config)[0], *gpu, tied)
    want = cases.outputs_and_grads(row_attention_loop, *wide, tied)
    errors = {key: cases.relative_error(got[key].cpu(), want[key]) for key in want}
    entropy = triton_row_attention_with_entropy(*gpu[:5], config=config)[1]
    errors["entropy"] = cases.relative_error(entropy.cpu(), cases.reference_entropy(*case[:4]))
    ok = max(errors.values()) <= tolerance
    passed &= ok
    print(f"{name:17s} {str(case[0].dtype):15s} vs fp64 (tolerance {tolerance:.0e}): {'ok' if ok else 'FAILED'} "
          + " ".join(f"{key} {value:.1e}" for key, value in errors.items()))


for name, (tied, d_in, d_emb, dtype_name, overrides) in cases.CASES.items():
    tolerance = cases.FP64_TOLERANCE if dtype_name == "float64" else cases.FP32_TOLERANCE
    compare(name, cases.make_case(tied, d_in, d_emb, getattr(torch, dtype_name)), tied, KernelConfig(**overrides),
            tolerance)
for tied in (False, True):
    compare(f"{'tied' if tied else 'untied'}_bf16", cases.make_case(tied, 40, 40 if tied else 24, torch.bfloat16),
            tied, KernelConfig(), cases.BF16_TOLERANCE)
generator = torch.Generator().manual_seed(1)
bounds = torch.tensor([0, 1, 4, 6, 10], device="cuda")
ids = torch.tensor([1, 3, 1, 0, 3, 2, 1], device="cuda")
x, keys = (torch.randn(n, 3, generator=generator, dtype=torch.float64).cuda().requires_grad_() for n in (7, 10))
values = torch.randn(10, 2, generator=generator, dtype=torch.float64).cuda().requires_grad_()
gradcheck = torch.autograd.gradcheck(lambda *a: triton_row_attention_with_entropy(a[0], ids, bounds, *a[1:])[0],
                                     (x, keys, values))
print(f"gradcheck fp64: {'ok' if gradcheck else 'FAILED'}")
passed &= gradcheck
for tied in (False, True):  # the benchmark's Zipf case, fp32 and bf16
    print(f"Zipf case, {'tied' if tied else 'untied'}:")
    passed &= check_against_fp64(tied, log=lambda line: print("  " + line))
sys.exit(0 if passed else 1)
PY

run_part benchmark cuda 300 "$PY" - <<'PY'
"""Forward, dX and dK/dV of the fused kernel timed apart, at 4K and 64K positions."""
import torch

from l3train.benchmarks.gpu import zipf_case
from l3train.model.l3_attention import _SortedRowAttention, plan_blocks
from l3train.model.l3_triton import triton_row_attention_with_entropy

torch.backends.cuda.matmul.allow_tf32 = False  # fp32: IEEE products (what training gets by default)
ITERS = 10


def milliseconds(fn) -> float:
    for _ in range(2):  # compile and warm caches outside the measurement
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(ITERS):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / ITERS


def triton(x, ids, bounds, keys, values):
    return triton_row_attention_with_entropy(x, ids, bounds, keys, values)[0]


def torch_sorted(x, ids, bounds, keys, values):  # what row_attention runs without Triton
    return _SortedRowAttention.apply(x, keys, values, plan_blocks(ids, bounds))[0]


def phases(case, tied: bool) -> dict:
    """The kernel's backward computes only the gradients its inputs require, so dX and dK/dV
    are timed on forwards where only x, or only the tables, require a gradient."""
    x, ids, bounds, keys, values, grad_out = case

    def inputs(x_grad: bool, table_grad: bool):
        k = keys.detach().requires_grad_(table_grad)
        return x.detach().requires_grad_(x_grad), ids, bounds, k, k if tied else values.detach().requires_grad_(table_grad)

    def backward_time(x_grad: bool) -> float:
        args = inputs(x_grad, not x_grad)
        out = triton(*args)
        wanted = [args[0]] if x_grad else ([args[3]] if tied else [args[3], args[4]])
        return milliseconds(lambda: torch.autograd.grad(out, wanted, grad_out, retain_graph=True))

    def whole(fn) -> float:
        def step():
            args = inputs(True, True)
            wanted = [args[0], args[3]] if tied else [args[0], args[3], args[4]]
            torch.autograd.grad(fn(*args), wanted, grad_out)
        return milliseconds(step)

    forward_args = inputs(True, True)
    return {"forward": milliseconds(lambda: triton(*forward_args)), "dX": backward_time(True),
            "dK/dV": backward_time(False), "forward+backward": whole(triton), "torch-sorted": whole(torch_sorted)}


print(f"device: {torch.cuda.get_device_name()}; vocab 32000, 8 rows per token before capping at k = 512, "
      f"d_in = d_emb = 1024; ms per call, mean of {ITERS}")
for positions in (4096, 65536):
    for dtype in (torch.bfloat16, torch.float32):
        for tied in (False, True):
            case = zipf_case(32000, positions, 8.0, 512, 1024, 1024, tied, dtype)
            times = phases(case, tied)
            print(f"N={positions:>5} {str(dtype).removeprefix('torch.'):8s} {'tied  ' if tied else 'untied'}: "
                  + "  ".join(f"{name} {ms:8.2f}" for name, ms in times.items())
                  + f"  (torch-sorted / Triton {times['torch-sorted'] / times['forward+backward']:.1f}x)")
            del case
            torch.cuda.empty_cache()
PY

run_part data any 300 "$PY" - "$WORK" <<'PY'
"""The test suite's tiny corpus (0.5 MB of stdlib docstrings), tokenizer (vocab 512), dataset and
LZW allocation, and a bf16 config of the suite's tiny L³ model."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from training_harness import tiny_l3_config, write_config

from l3train.data.corpus import build_corpus
from l3train.data.indexed import preprocess
from l3train.data.tokenizer import Tokenizer, iter_training_sentences, train_tokenizer

work = Path(sys.argv[1])
corpus = work / "corpus.jsonl"
build_corpus(corpus, max_mb=0.5, progress=False)
documents = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
tokenizer = train_tokenizer(iter_training_sentences(documents), work / "tokenizer", vocab_size=512)
prefix = str(work / "corpus")
preprocess(corpus, prefix, tokenizer.path, progress=False, log=lambda _: None)
allocation = work / "allocation.npz"
subprocess.run([sys.executable, "tools/lzw_allocate.py", "--data-prefix", prefix, "--tokenizer", str(tokenizer.path),
                "--eod-id", str(Tokenizer.load(tokenizer.path).eod_id), "--mode", "lzw", "--budget", "4096",
                "--cap", "64", "--output", str(allocation)], check=True, capture_output=True)
tree = tiny_l3_config(work / "run", SimpleNamespace(vocab_size=tokenizer.vocab_size, data_prefix=prefix,
                                                    tokenizer_path=tokenizer.path), allocation)
tree["training"]["precision"] = "bf16"
write_config(work / "tiny.yaml", tree)
print(f"{len(documents)} documents, vocab {tokenizer.vocab_size}, allocation {allocation.name}: {work / 'tiny.yaml'}")
PY

# One process (a world of one), as `python -m l3train.train`, with sync debugging on CUDA.
TRAIN='import runpy, sys, torch
if torch.cuda.is_available():
    torch.cuda.set_sync_debug_mode("warn")
runpy.run_module("l3train.train", run_name="__main__", alter_sys=True)'
for stage in 2 3; do
  if [ ! -f "$WORK/tiny.yaml" ]; then
    SUMMARY+=("$(printf '%-10s skipped: no data (the data part failed)' "train-z$stage")")
    FAILED=1
    continue
  fi
  run_part "train-z$stage" any 300 "$PY" - "$WORK" "$stage" "$TRAIN" <<'PY'
"""12 bf16 steps of the tiny L³ model on one device; losses, speed and host synchronisations."""
import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

work, stage, train = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
run_dir = work / f"run-zero{stage}"
result = subprocess.run([sys.executable, "-c", train, "--config", str(work / "tiny.yaml"), f"run_dir={run_dir}",
                         f"parallel.zero_stage={stage}"], capture_output=True, text=True, timeout=280)
print("\n".join(line for line in result.stdout.splitlines() if line.startswith("[l3train]")))
if result.returncode != 0:
    print(result.stderr[-4000:])
    sys.exit(f"the trainer exited with status {result.returncode}")
rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
losses = {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}
speed = sorted(row["train/tokens_per_s"] for row in rows if row.get("step", 0) > 1 and "train/tokens_per_s" in row)
validation = {row["step"]: row["val/loss"] for row in rows if "val/loss" in row}
print(f"train loss step 1 {losses[1]:.4f} -> step 12 {losses[12]:.4f}; validation loss "
      + ", ".join(f"step {step} {loss:.4f}" for step, loss in sorted(validation.items()))
      + f"; median {speed[len(speed) // 2]:.0f} tokens/s (steps 2-12); "
      f"checkpoint {(run_dir / 'checkpoints' / 'latest').read_text().strip()}")
if torch.cuda.is_available():
    sites = Counter(re.findall(r"^(\S+:\d+): UserWarning: called a synchronizing CUDA operation", result.stderr, re.M))
    print(f"host synchronisations (torch.cuda.set_sync_debug_mode('warn')): {len(sites)} distinct site(s)")
    for site in sorted(sites):
        print(f"  {site}")
else:
    print("sync debugging: skipped, needs CUDA (this run trained on the CPU)")
if sorted(losses) != list(range(1, 13)) or not all(map(math.isfinite, losses.values())) or losses[12] >= losses[1]:
    sys.exit(f"losses not finite and falling: {losses}")
PY
done

run_part sharded any 300 "$PY" - "$WORK" <<'PY'
"""tests/integration/test_bf16_accumulation.py's worker as a world of one (it prints its figures
and exits 1 on a broken bound); on a GPU it must have run over NCCL."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from training_harness import free_port

report = Path(sys.argv[1]) / "bf16_accumulation.json"
result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr",
                         "127.0.0.1", "--master_port", str(free_port()), "tests/integration/test_bf16_accumulation.py",
                         str(report)], capture_output=True, text=True, timeout=280)
# The worker's own lines; DeepSpeed's logs and deprecation warnings only when it failed.
print("\n".join(line for line in result.stdout.splitlines()
                if line.startswith(("[bf16 accumulation]", "dense ", "rows ", "clipping ", "FAILED"))))
if result.returncode:
    print(result.stdout[-3000:] + result.stderr[-5000:])
    sys.exit(f"the worker exited with status {result.returncode}")
ran = json.loads(report.read_text())
expected = ("cuda", "nccl") if torch.cuda.is_available() else ("cpu", "gloo")
if (ran["device"], ran["backend"]) != expected:
    sys.exit(f"ran on {ran['device']} over {ran['backend']}, expected {expected}")
PY

# The benchmark's model is configs/tiny_l3.yaml on the quick start's data (data/...).
run_part inference cuda 240 bash -c 'cd "$1" && if [ ! -f data/allocation/lzw_v32768_k128.npz ]; then
    echo "no data/ of the quick start (launch/quickstart.sh builds it): inference not measured"; exit 1; fi
  exec "$2" tools/bench_inference.py --device cuda --models tiny_l3 --batches 1 16 --reps 3 --new-tokens 16 \
    --no-memory --work-dir "$3/bench_inference" --markdown "$3/inference_benchmarks.md"' bash "$ROOT" "$PY" "$WORK"

run_part suite any 900 bash -c 'echo "pytest ${*:2}"
  exec env CUDA_VISIBLE_DEVICES= "$1" -m pytest -q -p no:cacheprovider --durations=5 "${@:2}"' bash "$PY" "${SUITE[@]}"

echo
echo "=== summary"
printf '%s\n' "${SUMMARY[@]}"
if [ "$FAILED" -ne 0 ]; then
  echo "gpu_check: FAILED"
  exit 1
fi
echo "gpu_check: ok"
