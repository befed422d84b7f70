"""The fused Triton row attention against the per-position reference loop.

Numerics run in Triton's interpreter on CPU tensors. TRITON_INTERPRET=1 must be set before
any `@triton.jit` decorator runs, and setting it in the pytest process would silently turn
every Triton kernel of the session (including compiled ones on a GPU machine) into
interpreted ones. So all interpreter checks run once in a child process, this file run as
a script with the variable set, which prints one JSON report; the tests here read it.
A separate test compiles the kernels for sm_90 (no GPU needed) to catch constructs that
only the interpreter accepts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

# (name, tied, d_in, d_emb, dtype, config overrides). Rows per token span 1..70 and the
# ids include unique and repeated tokens plus one with more positions than a tile.
# Default config: 32 positions, 32 rows, 32 features, so 80/70 features take 3 chunks, and
# tokens with 33 and 70 rows (forward, dx) or 40 positions (dK/dV) loop more than once,
# carrying partial sums through the scratch.
CASES = {
    "untied_wide": (False, 80, 70, "float32", {}),
    "tied_wide": (True, 80, 80, "float32", {}),
    # Feature blocks of 8 and 4 are below tl.dot's minimum of 16: the multiply-sum path.
    "untied_narrow": (False, 5, 3, "float32", {}),
    # Small tiles everywhere (multiply-sum), many tiles per token, rows and features; dK/dV
    # chunks of 16 positions: token 2's 40 positions take 3 chunks (fp32 partials summed).
    "tied_small_tiles": (True, 12, 12, "float32", {"positions": 8, "rows": 16, "features": 8,
                                                   "position_chunk": 16}),
    "untied_chunked": (False, 80, 70, "float32", {"positions": 16, "position_chunk": 16}),
    "untied_fp64": (False, 24, 17, "float64", {}),
}
FP32_TOLERANCE = 1e-5
FP64_TOLERANCE = 1e-12
BF16_TOLERANCE = 2e-2  # outputs and gradients are rounded to bf16 (2^-8 relative) on store


def make_case(tied: bool, d_in: int, d_emb: int, dtype: torch.dtype, seed: int = 0):
    from l3train.model.l3_layer import bounds_from_rows

    gen = torch.Generator().manual_seed(seed)
    rows = torch.tensor([1, 3, 70, 17, 2, 33, 1, 9])
    bounds = bounds_from_rows(rows)
    num_rows = int(bounds[-1])
    keys = torch.randn(num_rows, d_in, generator=gen, dtype=dtype)
    values = keys if tied else torch.randn(num_rows, d_emb, generator=gen, dtype=dtype)
    # Token 2 (70 rows) 40 times: more positions than one tile; 5 and 6 once each; token 7 absent.
    ids = torch.tensor([2] * 40 + [0, 1, 1, 3, 4, 5, 6, 3, 0, 1])
    ids = ids[torch.randperm(len(ids), generator=gen)]
    x = torch.randn(len(ids), d_in, generator=gen, dtype=dtype)
    grad_out = torch.randn(len(ids), d_emb, generator=gen, dtype=dtype)
    return x, ids, bounds, keys, values, grad_out


def make_hot_token_case(dtype: torch.dtype = torch.float32, seed: int = 0):
    """240 positions over 60 tokens; token 5 (64 rows) holds 30% of them."""
    from l3train.model.l3_layer import bounds_from_rows

    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, 40, (60,), generator=gen)
    rows[5] = 64
    bounds = bounds_from_rows(rows)
    others = torch.randint(0, 60, (168,), generator=gen)
    ids = torch.cat([torch.full((72,), 5), others[others != 5]])
    ids = ids[torch.randperm(len(ids), generator=gen)]
    keys = torch.randn(int(bounds[-1]), 24, generator=gen, dtype=dtype)
    values = torch.randn(int(bounds[-1]), 20, generator=gen, dtype=dtype)
    x = torch.randn(len(ids), 24, generator=gen, dtype=dtype)
    grad_out = torch.randn(len(ids), 20, generator=gen, dtype=dtype)
    return x, ids, bounds, keys, values, grad_out


def outputs_and_grads(fn, x, ids, bounds, keys, values, grad_out, tied):
    x = x.detach().clone().requires_grad_()
    keys = keys.detach().clone().requires_grad_()
    values = keys if tied else values.detach().clone().requires_grad_()
    out = fn(x, ids, bounds, keys, values)
    inputs = [x, keys] if tied else [x, keys, values]
    names = ["x", "keys"] if tied else ["x", "keys", "values"]
    grads = torch.autograd.grad(out, inputs, grad_out)
    return {"out": out.detach(), **{f"grad_{n}": g for n, g in zip(names, grads)}}


def reference_entropy(x, ids, bounds, keys):
    entropies = []
    for position, token in enumerate(ids.tolist()):
        probs = torch.softmax(keys[bounds[token]:bounds[token + 1]].double() @ x[position].double(), 0)
        entropies.append(-(probs * probs.log()).sum())
    return torch.stack(entropies)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def run_interpreter_checks() -> dict:
    """Everything that needs TRITON_INTERPRET=1; runs in the child process."""
    from l3train.model.l3_attention import row_attention_loop, row_attention_with_entropy

    report = {}
    # The CPU path must not even import the Triton module (the dispatch import is lazy).
    row_attention_with_entropy(*make_case(False, 4, 3, torch.float32)[:5])
    report["cpu_path_imported_triton"] = "l3train.model.l3_triton" in sys.modules

    from l3train.model.l3_triton import KernelConfig, triton_available, triton_row_attention_with_entropy

    report["triton_available"] = triton_available()
    for name, (tied, d_in, d_emb, dtype_name, overrides) in CASES.items():
        case = make_case(tied, d_in, d_emb, getattr(torch, dtype_name))
        config = KernelConfig(**overrides)
        fn = lambda *a: triton_row_attention_with_entropy(*a, config=config)[0]  # noqa: E731
        actual = outputs_and_grads(fn, *case, tied)
        expected = outputs_and_grads(row_attention_loop, *case, tied)
        errors = {key: relative_error(actual[key], expected[key]) for key in expected}
        x, ids, bounds, keys = case[:4]
        _, entropy = triton_row_attention_with_entropy(x, ids, bounds, keys, case[4], config=config)
        errors["entropy"] = relative_error(entropy, reference_entropy(x, ids, bounds, keys))
        report[name] = errors

    # bf16 in, fp32 statistics: compare with fp64 math on the same (bf16-rounded) inputs.
    case = make_case(False, 40, 24, torch.bfloat16)
    actual = outputs_and_grads(lambda *a: triton_row_attention_with_entropy(*a)[0], *case, False)
    expected = outputs_and_grads(row_attention_loop, *[t.double() if t.is_floating_point() else t for t in case],
                                 False)
    report["untied_bf16"] = {key: relative_error(actual[key], expected[key]) for key in expected}
    report["bf16_dtypes"] = [str(actual["out"].dtype), str(triton_row_attention_with_entropy(*case[:5])[1].dtype)]

    # gradcheck on a tiny table (rows 1, 3, 2, 4). fast_mode compares the analytic and numerical
    # Jacobians along random directions (torch's "fast gradcheck"): a wrong gradient of any input
    # entry still fails it, in 2 kernel evaluations per input instead of 2 per input entry
    # (18 s of the interpreter's time down to 2).
    gen = torch.Generator().manual_seed(1)
    bounds = torch.tensor([0, 1, 4, 6, 10])
    ids = torch.tensor([1, 3, 1, 0, 3, 2, 1])
    x = torch.randn(len(ids), 3, generator=gen, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(10, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    values = torch.randn(10, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = lambda x_, k_, v_: triton_row_attention_with_entropy(x_, ids, bounds, k_, v_)[0]  # noqa: E731
    report["gradcheck_fp64"] = torch.autograd.gradcheck(fn, (x, keys, values), fast_mode=True)

    # A hot token: 30% of the positions, spread over row blocks × chunks of 16 positions
    # (5 chunks); run twice to check the reduction of its partials is bitwise repeatable.
    case = make_hot_token_case()
    config = KernelConfig(positions=16, rows=16, position_chunk=16)
    fn = lambda *a: triton_row_attention_with_entropy(*a, config=config)[0]  # noqa: E731
    first, second = outputs_and_grads(fn, *case, False), outputs_and_grads(fn, *case, False)
    expected = outputs_and_grads(row_attention_loop, *case, False)
    report["hot_token"] = {key: relative_error(first[key], expected[key]) for key in expected}
    report["hot_token_repeatable"] = all(torch.equal(first[key], second[key]) for key in first)
    from l3train.model.l3_triton import plan_triton, triton_attend
    from l3train.utils.host_sync import HostSyncCounter
    plan = plan_triton(case[1], case[2], config)
    report["hot_token_work"] = {"partials": plan.tables.partial.shape[0], "sums": plan.tables.sums.shape[0],
                                "direct": plan.tables.direct.shape[0]}
    # Given its plan, the kernels' forward and backward never wait for the host.
    inputs = [t.detach().clone().requires_grad_() for t in (case[0], case[3], case[4])]
    with HostSyncCounter() as syncs:
        triton_attend(*inputs, plan)[0].backward(case[5])
    report["attend_host_syncs"] = syncs.calls

    out, entropy = triton_row_attention_with_entropy(x[:0], ids[:0], bounds, keys, values)
    report["empty_shapes"] = [list(out.shape), list(entropy.shape)]
    return report


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    result = subprocess.run([sys.executable, __file__], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_loop(report, name):
    tied, _, _, dtype_name, _ = CASES[name]
    tolerance = FP64_TOLERANCE if dtype_name == "float64" else FP32_TOLERANCE
    errors = report[name]
    expected_keys = {"out", "entropy", "grad_x", "grad_keys"} | (set() if tied else {"grad_values"})
    assert set(errors) == expected_keys
    assert max(errors.values()) <= tolerance, errors


def test_bf16_inputs_use_fp32_math(report):
    assert report["bf16_dtypes"] == ["torch.bfloat16", "torch.float32"]
    assert max(report["untied_bf16"].values()) <= BF16_TOLERANCE, report["untied_bf16"]


def test_hot_token_spreads_over_chunks_and_matches_the_loop(report):
    """Token 5 holds 72 of 240 positions: 4 row blocks × 5 chunks of partials, summed in a fixed order."""
    assert report["hot_token_work"]["sums"] == 4 and report["hot_token_work"]["partials"] == 20
    assert max(report["hot_token"].values()) <= FP32_TOLERANCE, report["hot_token"]
    assert report["hot_token_repeatable"]


def test_attend_never_waits_for_the_host(report):
    assert report["attend_host_syncs"] == []


def test_gradcheck_fp64(report):
    assert report["gradcheck_fp64"]


def test_empty_batch(report):
    assert report["empty_shapes"] == [[0, 2], [0]]


def test_cpu_path_does_not_import_triton_and_interpreter_is_available(report):
    assert report["cpu_path_imported_triton"] is False
    assert report["triton_available"] is True


def test_rejects_mismatched_shapes_and_dtypes():
    from l3train.model.l3_triton import triton_row_attention_with_entropy

    x, ids, bounds, keys, values, _ = make_case(False, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="one token id per row"):
        triton_row_attention_with_entropy(x, ids[:-1], bounds, keys, values)
    with pytest.raises(ValueError, match="keys must be"):
        triton_row_attention_with_entropy(x, ids, bounds, keys[:, :3], values)
    with pytest.raises(ValueError, match="share a dtype"):
        triton_row_attention_with_entropy(x, ids, bounds, keys.double(), values)


def test_work_list_covers_every_piece_once_heaviest_first():
    from l3train.model.l3_triton import _work_list

    sizes = torch.tensor([5, 1, 12, 4])  # pieces of ≤ 4: 2, 1, 3, 1
    loop_length = torch.tensor([3, 9, 1, 20])  # loops of 4: 1, 3, 1, 5 iterations
    work = _work_list(sizes, 4, loop_length, 4)
    owner, first, slot = work.items.t()
    assert sorted(zip(owner.tolist(), first.tolist())) == [(0, 0), (0, 4), (1, 0), (2, 0), (2, 4), (2, 8), (3, 0)]
    assert loop_length[owner].tolist() == [20, 9, 3, 3, 1, 1, 1]
    assert slot.tolist() == [0, 1, -1, -1, -1, -1, -1] and work.scratch_slots == 2


@pytest.mark.parametrize("dtype,precision,overrides", [("bf16", "tf32", {}), ("fp32", "ieee", {}),
                                                       ("fp64", "ieee", {"features": 8})])
def test_kernels_compile_for_sm90(dtype, precision, overrides):
    """Ahead-of-time compilation to a cubin: rejects interpreter-only constructs without a GPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from l3train.model import l3_triton

    config = l3_triton.KernelConfig(**overrides)
    statistics = "fp64" if dtype == "fp64" else "fp32"
    # Different d_in and d_emb blocks; with features=8 both are below tl.dot's minimum.
    constexprs = dict(BLOCK_P=config.positions, BLOCK_R=config.rows, BLOCK_DI=config.features,
                      BLOCK_DE=config.features // 2, COMPUTE=tl.float64 if dtype == "fp64" else tl.float32,
                      PRECISION=precision)
    kernels = [(l3_triton._forward_kernel, constexprs, False), (l3_triton._grad_x_kernel, constexprs, False),
               (l3_triton._grad_tables_kernel, {**constexprs, "TO_PARTIALS": False}, False),
               (l3_triton._grad_tables_kernel, {**constexprs, "TO_PARTIALS": True}, True),
               (l3_triton._sum_partials_kernel, dict(BLOCK_R=config.rows, BLOCK_F=config.features,
                                                     COMPUTE=constexprs["COMPUTE"]), False)]
    for kernel, kernel_constexprs, outputs_are_partials in kernels:
        signature = {}
        for arg in kernel.arg_names:
            if arg in kernel_constexprs:
                signature[arg] = "constexpr"
            elif arg in ("D_IN", "D_EMB", "WIDTH", "POSITION_CHUNK"):
                signature[arg] = "i32"
            elif arg in ("order_ptr", "segments_ptr", "tiles_ptr", "work_ptr", "sums_ptr"):
                signature[arg] = "*i64"
            elif (arg in ("lse_ptr", "entropy_ptr", "delta_ptr", "partials_ptr") or "scratch" in arg
                  or (outputs_are_partials and arg.startswith("out_"))):
                signature[arg] = "*" + statistics
            else:
                signature[arg] = "*" + dtype
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=kernel_constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps})
        assert compiled.asm["cubin"], kernel


def test_table_work_covers_every_row_block_and_chunk_once():
    from l3train.model.l3_triton import KernelConfig, _table_work

    # Tokens: (positions, rows) = (3, 5), (40, 9), (8, 1), (17, 4); blocks of 4 rows, chunks of 8
    # positions (tiles of 4): token 1 has 3 row blocks × 5 chunks, token 3 has 1 × 3.
    pos_count, row_count = torch.tensor([3, 40, 8, 17]), torch.tensor([5, 9, 1, 4])
    segments = torch.stack([torch.cumsum(pos_count, 0) - pos_count, pos_count,
                            torch.cumsum(row_count, 0) - row_count, row_count], 1)
    work = _table_work(segments, KernelConfig(positions=4, rows=4, position_chunk=8))
    assert work.direct[:, :2].tolist() == [[2, 0], [0, 0], [0, 4]]  # heaviest first: 8 then 3 positions
    assert work.direct[:, 3].tolist() == [0, -1, -1] and work.scratch_slots == 1  # 8 positions: two tiles
    assert work.sums.tolist() == [[1, 0, 0, 5], [1, 4, 5, 5], [1, 8, 10, 5], [3, 0, 15, 3]]
    chunks = sorted(map(tuple, work.partial[:, :3].tolist()))
    assert chunks == sorted([(1, r, p) for r in (0, 4, 8) for p in range(0, 40, 8)] + [(3, 0, p) for p in (0, 8, 16)])
    assert work.partial[:, 3].tolist() == list(range(18))
    for token, offset, first, count in work.sums.tolist():  # each row block's slots are its own chunks
        assert work.partial[first:first + count, :2].tolist() == [[token, offset]] * count


if __name__ == "__main__":
    print(json.dumps(run_interpreter_checks()))
