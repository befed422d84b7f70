"""The CPU kernel for the row attention: the training and inference path on CPUs (fp32 tables).

The torch implementation (`l3_attention._SortedRowAttention`) is exact but spends most of
its time outside arithmetic: block shapes padded up to 2× per axis, rows gathered into
copies, a zero-filled table-sized gradient buffer plus a scatter-add, and a dozen small ops
for each of dozens of chunks per layer. This kernel (`_l3_rows.c`, C compiled on first use
like the LZW trie, l3train.utils.c_library) does the same computation in one call per pass:

- positions are grouped by token id (a sort, as in the torch path); a group reads its
  token's rows in place from the tables, never padded and never copied;
- OpenMP runs groups in parallel; groups own disjoint rows, so row gradients accumulate
  with no atomics, and each group's arithmetic has one fixed order: results are
  deterministic and do not depend on the thread count;
- backward recomputes the scores from x and the saved log-sum-exp (FlashAttention-style),
  and writes each row of the gradient exactly once: no zero-filled buffer first, no
  scatter-add afterwards. Two layouts: table-shaped (a group's rows by the group, the rows
  no position of the batch owns zeroed beside them), for tables whose gradients DeepSpeed
  reduces or copies into flat buffers; or, with `plan_cpu(row_sparse=True)`, row-sparse:
  only the rows of the batch's tokens, as a sparse COO gradient (`row_sparse_gradient`),
  for the sharded rows and one process's tables at ZeRO-0 in fp32, whose AdamW steps that
  form directly (l3train.optim.SkippableAdamW, l3train.row_adamw).

fp32 throughout (scores, softmax, accumulation); other dtypes take the torch path, which
stays the reference and the fallback (also when no C compiler is found). A token must own
at least one row (every allocation gives one).
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from l3train.errors import L3TrainError
from l3train.utils.c_library import load_c_library

_SOURCE = Path(__file__).with_name("_l3_rows.c")
# -march=native: the library is built on the machine that runs it (keyed by its CPU's
# features in the cache); OpenMP links the runtime torch already loaded (same soname).
_COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99")


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with one warning) where it cannot be built."""
    try:
        library = load_c_library(_SOURCE, _COMPILE_FLAGS, "the CPU row-attention kernel")
    except L3TrainError as err:
        warnings.warn(f"{err}; the L³ layers use the slower torch implementation instead", stacklevel=2)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.l3_rows_forward.restype = ctypes.c_int
    library.l3_rows_forward.argtypes = [size, pointer, pointer, pointer, pointer, pointer, size, pointer, size,
                                        pointer, pointer, size, pointer, pointer, pointer, ctypes.c_int]
    library.l3_rows_backward.restype = ctypes.c_int
    library.l3_rows_backward.argtypes = [size, pointer, pointer, pointer, pointer, pointer, size, pointer, size,
                                         pointer, pointer, size, pointer, pointer, pointer, size, pointer, pointer,
                                         pointer, pointer, ctypes.c_int]
    return library


def cpu_kernel_available() -> bool:
    """Whether the kernel is built (compiling it on first call)."""
    return _library() is not None


# Multiply-adds of a forward pass below which one thread runs it (~50 µs of work).
SERIAL_WORK = 1 << 20


@dataclass
class CpuPlan:
    """One micro-batch's groups: the positions of each distinct token id (in token order)."""

    num_positions: int
    order: Tensor  # (N,) positions sorted by token id
    position_start: Tensor  # (groups + 1,) group g's positions are order[position_start[g]:position_start[g+1]]
    row_start: Tensor  # (groups,) first row of group g's token
    row_count: Tensor  # (groups,) its rows
    schedule: Tensor  # (groups,) groups by decreasing work, the order threads take them (load balance)
    max_rows: int
    scores: int  # Σ over groups of positions × rows: the work, in score entries
    # Backward gives the tables row-sparse gradients (`row_sparse_gradient`), not table-shaped ones.
    row_sparse: bool = False

    def threads(self, feature_width: int) -> int:
        """Threads worth starting: one for small work (a decode step), where waking a thread team
        costs more than it saves (and on a busy machine a team waits for its slowest thread's
        core), else torch's intra-op thread count, at most one per group."""
        if self.scores * feature_width < SERIAL_WORK:
            return 1
        return max(1, min(torch.get_num_threads(), self.groups))

    @property
    def groups(self) -> int:
        return len(self.row_start)

    @functools.cached_property
    def touched_rows(self) -> tuple[Tensor, Tensor]:
        """The rows of the groups' tokens in token (= row) order, and where each group's rows start
        in that list: the layout of a row-sparse gradient (made once per plan: the layers and
        micro-batch share it)."""
        compact_start = torch.cumsum(self.row_count, 0) - self.row_count
        rows = torch.repeat_interleave(self.row_start - compact_start, self.row_count) + torch.arange(
            int(self.row_count.sum()))
        return rows, compact_start


def plan_cpu(token_ids: Tensor, bounds: Tensor, row_sparse: bool = False) -> CpuPlan:
    """Group the positions of `token_ids` (N,) by token; reads sizes on the host (CPU tensors).
    `row_sparse`: backward gives the tables row-sparse gradients (`row_sparse_gradient`)."""
    token_ids = token_ids.reshape(-1)
    sorted_ids, order = torch.sort(token_ids, stable=True)
    unique_ids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    row_start = bounds[unique_ids]
    row_count = bounds[unique_ids + 1] - row_start
    if len(row_count) and int(row_count.min()) < 1:
        raise L3TrainError(f"token {int(unique_ids[row_count.argmin()])} owns no rows in the L³ allocation; "
                           f"every token needs at least one")
    work = counts * row_count
    schedule = torch.argsort(work, descending=True, stable=True)
    return CpuPlan(num_positions=token_ids.numel(), order=order.contiguous(),
                   position_start=torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]),
                   row_start=row_start.contiguous(), row_count=row_count.contiguous(), schedule=schedule,
                   max_rows=int(row_count.max()) if len(row_count) else 0, scores=int(work.sum()),
                   row_sparse=row_sparse)


def _groups(plan: CpuPlan) -> list:
    return [plan.groups, plan.position_start.data_ptr(), plan.order.data_ptr(), plan.row_start.data_ptr(),
            plan.row_count.data_ptr(), plan.schedule.data_ptr(), plan.max_rows]


def _check(failed: int) -> None:
    if failed:
        raise MemoryError("the CPU row-attention kernel could not allocate its scratch buffers")


class _CpuRowAttention(torch.autograd.Function):
    """fp32 row attention in the C kernel; backward recomputes the scores."""

    @staticmethod
    def forward(ctx, x: Tensor, keys: Tensor, values: Tensor, plan: CpuPlan) -> tuple[Tensor, Tensor]:
        x, keys, values = x.contiguous(), keys.contiguous(), values.contiguous()
        out = x.new_empty(plan.num_positions, values.shape[1])
        log_norm = x.new_empty(plan.num_positions)
        entropy = x.new_empty(plan.num_positions)
        _check(_library().l3_rows_forward(*_groups(plan), x.data_ptr(), x.shape[1], keys.data_ptr(),
                                          values.data_ptr(), values.shape[1], out.data_ptr(), log_norm.data_ptr(),
                                          entropy.data_ptr(), plan.threads(x.shape[1] + values.shape[1])))
        ctx.save_for_backward(x, keys, values, out, log_norm)
        ctx.plan, ctx.tied = plan, values is keys
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_entropy: Tensor):
        x, keys, values, out, log_norm = ctx.saved_tensors
        plan, tied = ctx.plan, ctx.tied
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x)  # every position belongs to one group, which writes it
        rows, compact_start = plan.touched_rows if plan.row_sparse else (None, None)
        grad_rows = keys.shape[0] if rows is None else len(rows)  # every one written once by the kernel
        grad_keys = keys.new_empty(grad_rows, keys.shape[1])
        grad_values = grad_keys if tied else values.new_empty(grad_rows, values.shape[1])
        # Row-sparse with no groups: no rows to write (and an empty compact_start's pointer may be NULL).
        if rows is None or plan.groups:
            _check(_library().l3_rows_backward(*_groups(plan), x.data_ptr(), x.shape[1], keys.data_ptr(),
                                               values.data_ptr(), values.shape[1], out.data_ptr(), log_norm.data_ptr(),
                                               grad_out.data_ptr(), keys.shape[0],
                                               None if rows is None else compact_start.data_ptr(), grad_x.data_ptr(),
                                               grad_keys.data_ptr(), grad_values.data_ptr(),
                                               plan.threads(x.shape[1] + values.shape[1])))
        if rows is not None:
            grad_keys = row_sparse_gradient(rows, grad_keys, keys.shape)
            grad_values = grad_keys if tied else row_sparse_gradient(rows, grad_values, values.shape)
        return grad_x, grad_keys, None if tied else grad_values, None


def row_sparse_gradient(rows: Tensor, values: Tensor, shape: torch.Size) -> Tensor:
    """A table's gradient that holds only `rows` (increasing, distinct): a coalesced sparse COO
    tensor of `shape` with one dense row of `values` per index. Autograd accumulates it over
    micro-batches like a dense one (as an `nn.Embedding(sparse=True)` gradient)."""
    return torch.sparse_coo_tensor(rows[None], values, shape, is_coalesced=True, check_invariants=False)


def coalesce_row_sparse_gradient(table: Tensor) -> None:
    """After autograd adds a micro-batch's row-sparse gradient into `table.grad` (sparse +
    sparse), leave it coalesced, each row once, in tensors of exactly the rows the micro-
    batches touched (at most the table). Autograd's sum merges two coalesced gradients into
    storages sized for both, or concatenates them (rows twice; `coalesce()` would keep the
    concatenation's storage): more than the whole table once the micro-batches reach most
    rows. A first micro-batch's gradient is the kernel's, whose rows are increasing and
    distinct, but autograd's shallow copy drops its coalesced flag: checked (strictly
    increasing rows) and set back, without a sort or a copy."""
    grad = table.grad
    if grad is None or not grad.is_sparse:
        return
    rows, values = grad._indices()[0], grad._values()
    if grad.is_coalesced():
        if values.untyped_storage().nbytes() > values.nbytes:  # a sum of coalesced gradients, merged
            table.grad = row_sparse_gradient(rows.clone(), values.clone(), grad.shape)
        return
    if bool((rows[1:] > rows[:-1]).all()):
        grad._coalesced_(True)
        return
    touched, where = torch.unique(rows, sorted=True, return_inverse=True)
    # In the concatenation's order: a row's parts are added micro-batch by micro-batch (deterministic).
    summed = values.new_zeros(len(touched), *values.shape[1:]).index_add_(0, where, values)
    table.grad = row_sparse_gradient(touched, summed, grad.shape)


def gradient_rows(grad: Tensor) -> Tensor:
    """The values a gradient holds: a dense gradient itself, a coalesced row-sparse one's rows
    (a view: scaling them in place scales the gradient and keeps it coalesced)."""
    return grad._values() if grad.is_sparse else grad


def cpu_attend(x: Tensor, keys: Tensor, values: Tensor, plan: CpuPlan) -> tuple[Tensor, Tensor]:
    """Row attention of the positions `plan` was made for: (N, d_emb) outputs in x's dtype, and
    (N,) entropies (no gradient). The tables must be fp32 (`plan_lookup` chooses this path then)."""
    if x.is_cuda or keys.is_cuda or values.is_cuda:
        raise L3TrainError("the CPU row-attention kernel takes CPU tensors; plan with plan_lookup(implementation='auto')")
    if keys.dtype != torch.float32 or values.dtype != torch.float32:
        raise L3TrainError(f"the CPU row-attention kernel takes fp32 tables, got {keys.dtype}/{values.dtype}")
    if values is not keys and keys.shape[0] != values.shape[0]:
        raise L3TrainError(f"key and value tables differ in rows: {keys.shape[0]} vs {values.shape[0]}")
    out, entropy = _CpuRowAttention.apply(x.float(), keys, values, plan)
    return out.to(x.dtype), entropy
