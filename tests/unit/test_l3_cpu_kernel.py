"""The CPU row-attention kernel (l3train.model.l3_cpu) against the per-position loop in fp64."""

import subprocess
import sys

import pytest
import torch

from l3train.model.l3_attention import (BlockPlan, attend, plan_lookup, row_attention, row_attention_loop,
                                        row_attention_with_entropy)
from l3train.model.l3_cpu import CpuPlan
from l3train.model.l3_layer import bounds_from_rows
from tests.unit.test_l3_layer import assert_close_relative, make_case, outputs_and_grads

kernel = lambda *a: row_attention(*a, implementation="cpu")  # noqa: E731


def fp32(case):
    x, ids, bounds, keys, values = case
    return x.float(), ids, bounds, keys.float(), values.float()


@pytest.mark.parametrize("tied,d_in,d_emb", [(True, 12, 12), (False, 12, 8), (True, 48, 48), (False, 40, 35)])
def test_kernel_matches_reference_loop(tied, d_in, d_emb):
    """Values and all gradients; the case has a 512-row token at 30 positions and unique tokens.
    Widths below, at and between multiples of the kernel's 16-float vectors."""
    case = make_case(seed=3, dtype=torch.float64, tied=tied, d_in=d_in, d_emb=d_emb)
    expected = outputs_and_grads(row_attention_loop, *case, tied)
    for got, want in zip(outputs_and_grads(kernel, *fp32(case), tied), expected):
        assert got.dtype == torch.float32
        assert_close_relative(got.double(), want, 1e-5)


def test_entropy_matches_softmax_entropy():
    x, ids, bounds, keys, values = fp32(make_case(seed=8, dtype=torch.float64, tied=False))
    _, entropy = row_attention_with_entropy(x, ids, bounds, keys, values, implementation="cpu")
    for position in (0, 31, 100, len(ids) - 1):
        token = int(ids[position])
        probs = torch.softmax(keys[bounds[token]:bounds[token + 1]].double() @ x[position].double(), 0)
        assert entropy[position].item() == pytest.approx(-(probs * probs.log()).sum().item(), rel=1e-5, abs=1e-6)


def test_hot_token_with_the_most_rows():
    """One token at 600 positions over 512 rows (many tiles of one group), and a rare one."""
    bounds = bounds_from_rows(torch.tensor([512, 3, 7]))
    ids = torch.cat([torch.zeros(600, dtype=torch.long), torch.tensor([1, 2, 2, 0])])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(ids), 16, generator=gen, dtype=torch.float64)
    keys = torch.randn(int(bounds[-1]), 16, generator=gen, dtype=torch.float64)
    expected = outputs_and_grads(row_attention_loop, x, ids, bounds, keys, keys, True)
    for got, want in zip(outputs_and_grads(kernel, x.float(), ids, bounds, keys.float(), keys.float(), True), expected):
        assert_close_relative(got.double(), want, 1e-5)


def test_empty_batch_gives_empty_outputs_and_zero_row_gradients():
    bounds = bounds_from_rows(torch.tensor([2, 3]))
    x = torch.zeros(0, 4, requires_grad=True)
    keys = torch.randn(5, 4, requires_grad=True)
    out, entropy = row_attention_with_entropy(x, torch.zeros(0, dtype=torch.long), bounds, keys, keys,
                                              implementation="cpu")
    assert out.shape == (0, 4) and entropy.shape == (0,)
    grad_x, grad_keys = torch.autograd.grad(out.sum(), [x, keys], allow_unused=False)
    assert grad_x.shape == (0, 4) and torch.equal(grad_keys, torch.zeros(5, 4))


def test_rows_no_position_uses_get_zero_gradient():
    """The kernel writes the whole gradient itself (no zero-filled buffer first): rows of
    tokens absent from the batch, before, between and after the used ones, must come out 0."""
    bounds = bounds_from_rows(torch.tensor([3, 2, 4, 1, 5]))
    keys = torch.randn(15, 6, requires_grad=True)
    ids = torch.tensor([1, 3, 1])
    x = torch.randn(3, 6)
    (grad_keys,) = torch.autograd.grad(kernel(x, ids, bounds, keys, keys).square().sum(), [keys])
    used = torch.zeros(15, dtype=torch.bool)
    used[3:5] = used[9:10] = True
    assert torch.equal(grad_keys[~used], torch.zeros(int((~used).sum()), 6))
    assert (grad_keys[used].abs().sum(1) > 0).all()


@pytest.mark.parametrize("tied", [True, False])
def test_row_sparse_gradient_holds_the_table_shaped_one_rows(tied):
    """With `row_sparse_gradients` (the sharded rows' plans) the tables' gradients hold only the
    rows of the batch's tokens, bitwise those of the table-shaped gradient, which is zero
    elsewhere; x's gradient is unchanged. Also for a batch with no positions (no rows)."""
    x, ids, bounds, keys, values = fp32(make_case(seed=5, dtype=torch.float64, tied=tied))
    ids = ids.remainder(20)  # tokens 20-39 absent: rows the gradient leaves out

    def grads(row_sparse: bool, ids=ids, x=x):
        plan = plan_lookup(ids, bounds, implementation="cpu", row_sparse_gradients=row_sparse)
        return outputs_and_grads(lambda x, _i, _b, k, v: attend(x, k, v, plan)[0], x, ids, bounds, keys, values, tied)

    dense, sparse = grads(False), grads(True)
    assert torch.equal(dense[0], sparse[0]) and torch.equal(dense[1], sparse[1])
    owned = torch.cat([torch.arange(int(bounds[t]), int(bounds[t + 1])) for t in torch.unique(ids)])
    for table_dense, table_sparse in zip(dense[2:], sparse[2:]):
        assert table_sparse.is_sparse and table_sparse.is_coalesced()
        assert torch.equal(table_sparse._indices()[0], owned)  # increasing: token order is row order
        assert torch.equal(table_sparse._values(), table_dense[owned])
        assert torch.equal(table_sparse.to_dense(), table_dense)
        absent = ~torch.isin(torch.arange(len(table_dense)), owned)
        assert absent.sum() > 100 and not table_dense[absent].any()
    no_ids, no_x = torch.zeros(0, dtype=torch.long), torch.zeros(0, x.shape[1])
    for table, gradient in zip([keys, values], grads(True, no_ids, no_x)[2:]):
        assert gradient.is_sparse and gradient._nnz() == 0 and gradient.shape == table.shape


def test_deterministic_and_independent_of_threads():
    case = fp32(make_case(seed=11, dtype=torch.float64, tied=False, n=400))
    threads = torch.get_num_threads()
    try:
        runs = []
        for count in (1, 2, 2):
            torch.set_num_threads(count)
            runs.append(outputs_and_grads(kernel, *case, False))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_plan_chooses_the_kernel_for_fp32_cpu_tables_only():
    ids, bounds = torch.tensor([0, 1, 1]), bounds_from_rows(torch.tensor([2, 3]))
    assert isinstance(plan_lookup(ids, bounds, 8), CpuPlan)
    for dtype in (torch.float64, torch.bfloat16):
        assert isinstance(plan_lookup(ids, bounds, 8, table_dtype=dtype), BlockPlan)
    assert isinstance(plan_lookup(ids, bounds, 8, implementation="torch"), BlockPlan)


def test_without_a_compiler_the_torch_path_is_used(tmp_path):
    code = ("import warnings, torch\n"
            "from l3train.model.l3_attention import BlockPlan, plan_lookup\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    plan = plan_lookup(torch.tensor([0, 1]), torch.tensor([0, 2, 5]), 8)\n"
            "print(type(plan).__name__, '|', caught[0].message)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "L3TRAIN_CACHE": str(tmp_path), "CC": "no-such-cc"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("BlockPlan |") and "no C compiler found" in result.stdout
    assert "slower torch implementation" in result.stdout


def test_training_keeps_freed_memory_for_the_next_step():
    """glibc's thresholds are raised (l3train.utils.allocator): this machine's malloc is glibc's."""
    from l3train.utils.allocator import keep_freed_memory

    assert keep_freed_memory()


def test_asking_for_the_kernel_with_tables_it_cannot_take_is_one_error():
    from l3train.errors import L3TrainError

    bounds = bounds_from_rows(torch.tensor([2, 3]))
    table = torch.zeros(5, 4, dtype=torch.float64)
    with pytest.raises(L3TrainError, match="fp32 tables"):
        row_attention(torch.zeros(2, 4, dtype=torch.float64), torch.tensor([0, 1]), bounds, table, table,
                      implementation="cpu")
