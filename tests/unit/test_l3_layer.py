"""The sorted block-diagonal L³ against the per-position reference loop."""

import numpy as np
import pytest
import torch

from l3train.model.l3_attention import (plan_blocks, row_attention, row_attention_loop, row_attention_padded,
                                        row_attention_with_entropy)
from l3train.model.l3_layer import LargeLookupLayer, bounds_from_rows


def make_case(seed, dtype, tied, vocab=40, d_in=12, d_emb=8, n=240, max_rows=512):
    """A random allocation spanning d_t = 1 .. max_rows, with repeated and unique ids."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, 24, (vocab,), generator=gen)
    rows[0], rows[1], rows[2] = 1, max_rows, 2  # the extremes are always present
    bounds = bounds_from_rows(rows)
    num_rows = int(bounds[-1])
    keys = torch.randn(num_rows, d_in, generator=gen, dtype=dtype)
    values = keys if tied else torch.randn(num_rows, d_emb, generator=gen, dtype=dtype)
    ids = torch.randint(0, vocab, (n,), generator=gen)
    ids[:30] = 1  # a token with 512 rows seen many times
    ids[30:35] = 0
    ids[-1] = vocab - 1  # likely unique
    x = torch.randn(n, d_in, generator=gen, dtype=dtype)
    return x, ids, bounds, keys, values


def outputs_and_grads(fn, x, ids, bounds, keys, values, tied):
    x = x.clone().requires_grad_()
    keys = keys.clone().requires_grad_()
    values = keys if tied else values.clone().requires_grad_()
    out = fn(x, ids, bounds, keys, values)
    # Drawn in fp64 whatever the dtype, so runs in different dtypes get the same gradient.
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    inputs = [x, keys] if tied else [x, keys, values]
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]


def assert_close_relative(actual, expected, tol):
    scale = expected.abs().max().clamp_min(1e-30)
    assert ((actual - expected).abs().max() / scale).item() <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("max_scores", [64, 1 << 24])  # many tiny chunks, and one chunk per bucket
def test_sorted_matches_reference_loop(dtype, tied, max_scores):
    d_emb = 12 if tied else 8
    case = make_case(seed=3, dtype=dtype, tied=tied, d_emb=d_emb)
    expected = outputs_and_grads(row_attention_loop, *case, tied)
    sorted_fn = lambda *a: row_attention(*a, max_elements_per_chunk=max_scores, implementation="torch")  # noqa: E731
    actual = outputs_and_grads(sorted_fn, *case, tied)
    for got, want in zip(actual, expected):
        assert_close_relative(got, want, 1e-5)


def test_padded_baseline_matches_reference_loop():
    case = make_case(seed=4, dtype=torch.float64, tied=False)
    for got, want in zip(outputs_and_grads(row_attention_padded, *case, False),
                         outputs_and_grads(row_attention_loop, *case, False)):
        assert_close_relative(got, want, 1e-10)


@pytest.mark.parametrize("implementation,dtype,tol", [("torch", torch.float64, 1e-10), ("cpu", torch.float32, 1e-5)])
def test_all_unique_and_all_repeated_ids(implementation, dtype, tol):
    x, _, bounds, keys, values = make_case(seed=5, dtype=torch.float64, tied=False, n=40)
    attention = lambda *a: row_attention(*a, implementation=implementation)  # noqa: E731
    for ids in (torch.arange(40), torch.full((40,), 1)):
        actual = outputs_and_grads(attention, x.to(dtype), ids, bounds, keys.to(dtype), values.to(dtype), False)
        for got, want in zip(actual, outputs_and_grads(row_attention_loop, x, ids, bounds, keys, values, False)):
            assert_close_relative(got.double(), want, tol)


def test_gradcheck_fp64():
    x, ids, bounds, keys, values = make_case(seed=6, dtype=torch.float64, tied=False, vocab=6, d_in=3,
                                             d_emb=2, n=9, max_rows=5)
    inputs = (x.requires_grad_(), keys.requires_grad_(), values.requires_grad_())
    fn = lambda x_, k_, v_: row_attention(x_, ids, bounds, k_, v_, max_elements_per_chunk=8,  # noqa: E731
                                          implementation="torch")
    assert torch.autograd.gradcheck(fn, inputs)


def test_entropy_matches_softmax_entropy():
    x, ids, bounds, keys, values = make_case(seed=8, dtype=torch.float64, tied=False)
    _, entropy = row_attention_with_entropy(x, ids, bounds, keys, values)
    for position in (0, 31, 100, len(ids) - 1):
        token = int(ids[position])
        probs = torch.softmax(keys[bounds[token]:bounds[token + 1]] @ x[position], 0)
        assert entropy[position].item() == pytest.approx(-(probs * probs.log()).sum().item(), rel=1e-9)


def saved_bytes(fn, *args):
    """Bytes autograd keeps for backward beyond the inputs themselves."""
    inputs = {a.data_ptr() for a in args if isinstance(a, torch.Tensor)}
    total = 0

    def pack(tensor):
        nonlocal total
        if tensor.data_ptr() not in inputs:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


@pytest.mark.parametrize("implementation", ["torch", "cpu"])
def test_memory_scales_with_positions_not_cap(implementation):
    """Sorted L³ (torch path and CPU kernel) saves O(N·d) for backward, independent of k; the
    padded baseline saves N·k·d."""
    n, d = 256, 16
    ids = torch.arange(n) % 32
    x = torch.randn(n, d, requires_grad=True)
    usage = {}
    for cap in (8, 512):
        rows = torch.full((32,), cap)
        bounds = bounds_from_rows(rows)
        keys = torch.randn(int(bounds[-1]), d, requires_grad=True)
        usage[cap] = (saved_bytes(lambda *a: row_attention(*a, implementation=implementation), x, ids, bounds, keys,
                                  keys),
                      saved_bytes(row_attention_padded, x, ids, bounds, keys, keys))
    sorted_small, padded_small = usage[8]
    sorted_large, padded_large = usage[512]
    assert sorted_large == sorted_small  # does not grow with k
    assert sorted_large <= 4 * n * d * 4  # out + log-normaliser, a few N·d floats
    assert padded_large >= 8 * sorted_large  # the baseline it replaces grows with N·k


def test_plan_padding_is_bounded():
    """Per chunk, padding is < 2× per axis: gathered rows ≤ 2·Σ_unique d_t, scores ≤ 4·Σ_p d_t."""
    rows = torch.tensor([1, 2, 3, 5, 9, 17, 33, 100, 300, 512])
    bounds = bounds_from_rows(rows)
    ids = torch.cat([torch.full((c,), t) for t, c in enumerate([1, 3, 7, 2, 30, 5, 9, 4, 1, 60])])
    plan = plan_blocks(ids, bounds)
    gathered = sum(c.rows.numel() for c in plan.chunks)
    scores = sum(c.positions.shape[0] * c.positions.shape[1] * c.rows.shape[1] for c in plan.chunks)
    assert gathered <= 2 * int(rows.sum())
    assert scores <= 4 * int(rows[ids].sum())
    covered = torch.cat([c.positions[c.position_valid] for c in plan.chunks])
    assert torch.equal(covered.sort().values, torch.arange(len(ids)))


def naive_layer_forward(layer, x, ids):
    keys, values = layer.rows.tables()
    looked_up = row_attention_loop(x, ids, layer.bounds, keys, values)
    return layer.mix(torch.cat([layer.norm(layer.up(looked_up)), x], -1))


@pytest.mark.parametrize("tied,norm", [(True, "rms"), (False, "layer")])
def test_layer_matches_formula_with_all_gradients(tied, norm):
    torch.manual_seed(0)
    rows = np.array([1, 4, 512, 2, 7, 3])
    layer = LargeLookupLayer(rows, d_in=16, d_emb=16 if tied else 8, d_up=24, tied_kv=tied, norm=norm).double()
    x = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 6, (50,))
    results = []
    for forward in (lambda: layer(x, ids)[0], lambda: naive_layer_forward(layer, x, ids)):
        layer.zero_grad()
        x.grad = None
        forward().pow(2).sum().backward()
        results.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    assert {"rows.key_table", "up.weight", "mix.weight"} <= set(names)
    for name, got, want in zip(names, *results):
        assert got.abs().max() > 0, name
        assert_close_relative(got, want, 1e-10)


def test_allocation_is_saved_and_loaded_with_weights():
    trained = LargeLookupLayer(np.array([3, 1, 2]), d_in=8, d_emb=8, d_up=8)
    other = LargeLookupLayer(np.array([1, 4, 1]), d_in=8, d_emb=8, d_up=8)
    state = trained.state_dict()
    assert torch.equal(state["bounds"], torch.tensor([0, 3, 4, 6]))
    other.load_state_dict(state)
    assert torch.equal(other.bounds, trained.bounds)
    assert torch.equal(other.rows.key_table, trained.rows.key_table)


def test_tied_layer_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="d_emb == d_in"):
        LargeLookupLayer(np.array([1, 2]), d_in=8, d_emb=4, d_up=8, tied_kv=True)


def test_one_frequent_token_is_split_to_respect_the_chunk_budget():
    rows = torch.tensor([512, 3, 7])
    bounds = bounds_from_rows(rows)
    ids = torch.cat([torch.zeros(600, dtype=torch.long), torch.tensor([1, 2, 2])])
    budget = 512 * 64
    plan = plan_blocks(ids, bounds, max_elements_per_chunk=budget)
    assert max(c.positions.numel() * c.rows.shape[1] for c in plan.chunks) <= budget
    covered = torch.cat([c.positions[c.position_valid] for c in plan.chunks])
    assert torch.equal(covered.sort().values, torch.arange(len(ids)))
    x = torch.randn(len(ids), 4, dtype=torch.float64)
    keys = torch.randn(int(bounds[-1]), 4, dtype=torch.float64)
    split = lambda *a: row_attention(*a, max_elements_per_chunk=budget)  # noqa: E731
    for got, want in zip(outputs_and_grads(split, x, ids, bounds, keys, keys, True),
                         outputs_and_grads(row_attention_loop, x, ids, bounds, keys, keys, True)):
        assert_close_relative(got, want, 1e-10)


def test_bf16_inputs_get_fp32_scores_softmax_and_gradients():
    """The torch path upcasts bf16 blocks before every product: outputs and gradients stay
    within bf16's own rounding of the fp64 result on the same (bf16-rounded) inputs."""
    x, ids, bounds, keys, values = make_case(seed=8, dtype=torch.float64, tied=False, n=300, max_rows=200)
    x, keys, values = (t.to(torch.bfloat16) for t in (x, keys, values))
    grad_out = torch.randn(300, values.shape[1], generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    results = []
    for fn, dtype in ((row_attention, torch.bfloat16), (row_attention_loop, torch.float64)):  # bf16: torch path
        inputs = [t.to(dtype).requires_grad_() for t in (x, keys, values)]
        out = fn(inputs[0], ids, bounds, inputs[1], inputs[2])
        results.append([out.detach(), *torch.autograd.grad(out, inputs, grad_out.to(dtype))])
    for got, want in zip(*results):
        assert got.dtype == torch.bfloat16
        assert_close_relative(got.double(), want, 2 ** -7)  # bf16 keeps 8 bits of mantissa


def test_any_subset_of_rows_is_initialised_as_in_the_whole_table():
    from l3train.model.l3_layer import INIT_BLOCK_ROWS, init_rows

    num_rows = 3 * INIT_BLOCK_ROWS + 17
    whole = init_rows(num_rows, 8, 0.02, seed=5)
    assert whole.std().item() == pytest.approx(0.02, rel=0.05)
    subset = torch.tensor([num_rows - 1, 0, INIT_BLOCK_ROWS, 5, 2 * INIT_BLOCK_ROWS + 3])
    assert torch.equal(init_rows(num_rows, 8, 0.02, seed=5, rows=subset), whole[subset])
    assert not torch.equal(init_rows(num_rows, 8, 0.02, seed=6, rows=subset), whole[subset])
