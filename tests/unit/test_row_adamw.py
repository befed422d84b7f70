"""The row-sparse AdamW step (l3train.row_adamw) against torch's AdamW on the same gradient
made dense (zeros in the rows not listed), and against AdamW's formula in fp64."""

import copy

import pytest
import torch

from l3train.errors import L3TrainError
from l3train.model.l3_cpu import row_sparse_gradient
from l3train.row_adamw import row_sparse_adamw_step

ROWS, WIDTH = 300, 20
HYPER = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
# The rows each step's gradient holds: some every step, some sometimes, rows 250+ never; one
# step has none at all (its moments still decay and its weights still move).
STEP_ROWS = [torch.arange(0, 200, 2), torch.arange(0, 120), torch.tensor([], dtype=torch.long),
             torch.tensor([0, 1, 7, 199, 249]), torch.arange(100, 250)]
LRS = [1e-3, 3e-3, 2e-3, 5e-4, 1e-3]


def _gradients(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [row_sparse_gradient(rows, torch.randn(len(rows), WIDTH, generator=gen), torch.Size([ROWS, WIDTH]))
            for rows in STEP_ROWS]


def _run(gradients, sparse: bool, table: torch.Tensor) -> tuple[torch.Tensor, torch.optim.AdamW]:
    param = torch.nn.Parameter(table.clone())
    optimizer = torch.optim.AdamW([param], lr=LRS[0], fused=True, **HYPER)
    for lr, grad in zip(LRS, gradients):
        optimizer.param_groups[0]["lr"] = lr  # as the LR schedule sets it
        if sparse:
            row_sparse_adamw_step(optimizer, {param: grad})
        else:
            param.grad = grad.to_dense()
            optimizer.step()
    return param.detach(), optimizer


def _fp64_reference(gradients, table: torch.Tensor) -> torch.Tensor:
    """AdamW (decoupled weight decay, bias-corrected moments) over every element, in fp64."""
    (beta1, beta2), eps, decay = HYPER["betas"], HYPER["eps"], HYPER["weight_decay"]
    param, m, v = table.double(), torch.zeros(ROWS, WIDTH, dtype=torch.float64), torch.zeros(ROWS, WIDTH,
                                                                                             dtype=torch.float64)
    for step, (lr, grad) in enumerate(zip(LRS, gradients), start=1):
        g = grad.to_dense().double()
        param = param * (1 - lr * decay)
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
        param = param - lr / (1 - beta1 ** step) * m / ((v / (1 - beta2 ** step)).sqrt() + eps)
    return param


def test_every_row_moves_as_in_torchs_adamw_on_the_dense_gradient():
    table = torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(1))
    gradients = _gradients()
    sparse, sparse_optimizer = _run(gradients, True, table)
    dense, dense_optimizer = _run(gradients, False, table)
    reference = _fp64_reference(gradients, table)
    # Both within fp32 rounding of the fp64 formula, and of each other.
    torch.testing.assert_close(sparse.double(), reference, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(dense.double(), reference, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(sparse, dense, rtol=2e-6, atol=1e-7)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(sparse_optimizer.state[sparse_optimizer.param_groups[0]["params"][0]][key],
                                   dense_optimizer.state[dense_optimizer.param_groups[0]["params"][0]][key],
                                   rtol=2e-6, atol=1e-7)  # (values ~0.1-1; a few cancel to ~1e-3)
    # Rows no gradient ever held only decay (weight decay); rows absent from the last step
    # still move by their moments, unlike a lazy (SparseAdam) update.
    never = torch.arange(250, ROWS)
    torch.testing.assert_close(sparse[never], table[never] * torch.tensor(
        [1 - lr * HYPER["weight_decay"] for lr in LRS]).prod(), rtol=1e-6, atol=0)
    before_last, _ = _run(gradients[:-1], True, table)
    decayed_only = before_last[:100] * (1 - LRS[-1] * HYPER["weight_decay"])
    assert ((sparse[:100] - decayed_only).abs().amax(1) > 1e-5).all()  # rows 0-99: not in the last step's gradient


def test_state_is_torchs_adamw_state():
    """A checkpoint of the optimizer after row-sparse steps resumes in a plain torch AdamW (and
    the other way round) with the same result as continuing."""
    table = torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(2))
    gradients = _gradients(seed=3)
    param = torch.nn.Parameter(table.clone())
    optimizer = torch.optim.AdamW([param], lr=1e-3, fused=True, **HYPER)
    for grad in gradients[:3]:
        row_sparse_adamw_step(optimizer, {param: grad})
    state = copy.deepcopy(optimizer.state_dict())  # as a checkpoint holds it (state_dict() shares the tensors)
    assert state["state"][0]["step"].dtype == torch.float32 and float(state["state"][0]["step"]) == 3
    resumed = torch.nn.Parameter(param.detach().clone())
    dense = torch.optim.AdamW([resumed], lr=1e-3, fused=True, **HYPER)
    dense.load_state_dict(state)
    for grad in gradients[3:]:
        row_sparse_adamw_step(optimizer, {param: grad})
        resumed.grad = grad.to_dense()
        dense.step()
    torch.testing.assert_close(param.detach(), resumed.detach(), rtol=2e-6, atol=1e-7)
    # The other way round: torch's AdamW's state, continued by row-sparse steps.
    back = torch.nn.Parameter(resumed.detach().clone())
    sparse = torch.optim.AdamW([back], lr=1e-3, fused=True, **HYPER)
    sparse.load_state_dict(copy.deepcopy(dense.state_dict()))
    for grad in gradients[:2]:
        row_sparse_adamw_step(sparse, {back: grad})
        resumed.grad = grad.to_dense()
        dense.step()
    torch.testing.assert_close(back.detach(), resumed.detach(), rtol=2e-6, atol=1e-7)


def test_deterministic_and_independent_of_threads():
    table = torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(4))
    threads, runs = torch.get_num_threads(), []
    try:
        for count in (1, 2, 2):
            torch.set_num_threads(count)
            runs.append(_run(_gradients(), True, table)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0], run) for run in runs[1:])


def test_a_gradient_of_another_layout_is_refused_and_an_uncoalesced_one_summed():
    table = torch.randn(6, 3, generator=torch.Generator().manual_seed(5))
    param = torch.nn.Parameter(table.clone())
    optimizer = torch.optim.AdamW([param], lr=1e-3, fused=True, **HYPER)
    for wrong in (torch.ones(6, 3).to_sparse(), torch.ones(6, 3), row_sparse_gradient(
            torch.tensor([1]), torch.ones(1, 2), torch.Size([6, 2]))):
        with pytest.raises(L3TrainError, match="row-sparse AdamW step takes a 2-D table's gradient"):
            row_sparse_adamw_step(optimizer, {param: wrong})
    assert not optimizer.state  # a refused call steps nothing
    # Row 2 twice and out of order: summed (coalesced) first, as one gradient row.
    uncoalesced = torch.sparse_coo_tensor(torch.tensor([[2, 1, 2]]), torch.ones(3, 3), (6, 3))
    row_sparse_adamw_step(optimizer, {param: uncoalesced})
    reference = torch.nn.Parameter(table.clone())
    reference.grad = uncoalesced.to_dense()
    torch.optim.AdamW([reference], lr=1e-3, fused=True, **HYPER).step()
    torch.testing.assert_close(param.detach(), reference.detach(), rtol=2e-6, atol=1e-7)


def test_amsgrad_is_refused():
    param = torch.nn.Parameter(torch.zeros(4, 3))
    optimizer = torch.optim.AdamW([param], amsgrad=True)
    with pytest.raises(L3TrainError, match="neither amsgrad nor maximize"):
        row_sparse_adamw_step(optimizer, {param: row_sparse_gradient(torch.tensor([1]), torch.ones(1, 3), param.shape)})


def test_micro_batches_row_sparse_gradients_are_summed_as_they_arrive():
    """The tables' hook (`coalesce_row_sparse_gradient`): the first micro-batch's gradient
    keeps its rows (autograd's copy flagged coalesced again), later ones are summed in, each
    row once, as the dense sum would be, in tensors of just those rows."""
    from l3train.model.l3_cpu import coalesce_row_sparse_gradient

    table = torch.nn.Parameter(torch.zeros(ROWS, WIDTH))
    table.register_post_accumulate_grad_hook(coalesce_row_sparse_gradient)
    gradients, total = _gradients(seed=6), torch.zeros(ROWS, WIDTH)

    class Lookup(torch.autograd.Function):  # a backward that returns a given row-sparse gradient
        @staticmethod
        def forward(ctx, weights, grad):
            ctx.grad = grad
            return weights.sum()

        @staticmethod
        def backward(ctx, _):
            return ctx.grad, None

    for grad in gradients:
        Lookup.apply(table, grad).backward()
        total += grad.to_dense()
        assert table.grad.is_sparse and table.grad.is_coalesced()
        assert torch.equal(table.grad._indices()[0], torch.nonzero(total.abs().sum(1)).flatten())
        torch.testing.assert_close(table.grad.to_dense(), total)
        # No storage of the micro-batches' concatenation kept (coalesce() would keep one).
        values, rows = table.grad._values(), table.grad._indices()
        assert values.untyped_storage().nbytes() == values.nbytes and rows.untyped_storage().nbytes() == rows.nbytes


def test_rank_local_step_takes_row_sparse_and_dense_gradients_together():
    """`RankLocalParameters.step` (l3train.parallel.sharded_optim): a row-sparse gradient goes to
    the row step, a dense one (the torch and Triton paths) to the AdamW, in one step; the same
    as torch's AdamW with both dense."""
    from l3train.config import config_from_dict
    from l3train.parallel.sharded_optim import RankLocalParameters

    class Tables(RankLocalParameters):
        kind = "tables"

        def layout(self) -> dict:
            return {}

    cfg = config_from_dict({}, ["optimizer.warmup_steps=0", "optimizer.weight_decay=0.1"])
    tables = [torch.nn.Parameter(torch.randn(ROWS, WIDTH, generator=torch.Generator().manual_seed(seed)))
              for seed in (7, 8)]
    reference = [torch.nn.Parameter(table.detach().clone()) for table in tables]
    local = Tables(tables, "dense", cfg)
    expected = torch.optim.AdamW(reference, fused=True, **{key: local.optimizer.param_groups[0][key]
                                                           for key in ("lr", "betas", "eps", "weight_decay")})
    for grad in _gradients(seed=9)[:3]:
        tables[0].grad, tables[1].grad = grad, grad.to_dense() * 2
        reference[0].grad, reference[1].grad = grad.to_dense(), grad.to_dense() * 2
        expected.param_groups[0]["lr"] = local.optimizer.param_groups[0]["lr"]
        local.prepare_gradients()
        local.step()
        expected.step()
        assert tables[0].grad is None and tables[1].grad is None
    for got, want in zip(tables, reference):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=2e-6, atol=1e-7)
