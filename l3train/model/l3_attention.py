"""The row attention at the heart of L³: a_p = V_tᵀ softmax(K_t x_p) for each position p.

Token t owns the contiguous rows `bounds[t]:bounds[t+1]` of the key table K (v × d_in)
and the value table V (v × d_emb). Every position is independent and its rows are known
from its token id alone, so a batch can be reorganised freely before the layer runs.

Implementations, all with the same signature `(x, token_ids, bounds, keys, values)`:

- `row_attention_loop`: one position at a time. Obviously correct, slow; tests only.
- `row_attention_padded`: gather every position's rows padded to the batch's largest
  d_t. This is the memory-hungry approach the sorted kernel avoids (N·k scores and
  N·k·d gathered rows at k = 512); kept as the benchmark baseline.
- `row_attention`: the training implementation, and the reference and fallback of the
  CPU kernel (`l3_cpu.py`), which `plan_lookup` chooses for fp32 tables on the CPU: the
  same grouping by token id in one C call per pass. Positions are sorted by token id so
  equal ids become contiguous; each unique token's positions attend only to that
  token's rows (the score matrix is block diagonal). Blocks are grouped into buckets of
  similar (rows, positions) shape so each bucket is one batched matmul; padding inside
  a bucket is at most 2× per axis, never up to k. The autograd function stores only
  x, the output and the per-position log-sum-exp, and recomputes scores in backward
  (as FlashAttention does), so memory between forward and backward is O(N·d); scores
  exist one bounded chunk at a time. Scores, softmax and their gradients are computed in
  fp32 for bf16 inputs (in the input dtype for fp32/fp64). For CUDA token ids with Triton
  available, the plan is the fused kernels' (`l3_triton.py`) instead, and `attend` runs
  them; `max_elements_per_chunk` does not apply there.

Planning (`plan_lookup`) and attending (`attend`) are separate: the plan depends on the
token ids only, so a model builds it once per micro-batch for all its L³ layers, and the
layers themselves never wait for the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor

from l3train.errors import L3TrainError
from l3train.model.l3_cpu import CpuPlan, cpu_attend, cpu_kernel_available, plan_cpu

if TYPE_CHECKING:
    from l3train.model.l3_triton import TritonPlan

# Largest number of elements a chunk of the sorted implementation materialises at once:
# its scores (positions × rows) plus its gathered rows and positions (rows × features,
# positions × features). Bounds its transient memory independently of batch size and of
# the number of unique tokens (16M fp32 elements: 64 MB per buffer).
DEFAULT_MAX_ELEMENTS_PER_CHUNK = 1 << 24


def row_attention_loop(x: Tensor, token_ids: Tensor, bounds: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Reference: each position attends over its own token's rows, one at a time."""
    outputs = []
    for position, token in enumerate(token_ids.tolist()):
        start, end = int(bounds[token]), int(bounds[token + 1])
        scores = keys[start:end] @ x[position]
        outputs.append(values[start:end].t() @ torch.softmax(scores, dim=0))
    return torch.stack(outputs) if outputs else x.new_zeros(0, values.shape[1])


def row_attention_padded(x: Tensor, token_ids: Tensor, bounds: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Baseline: pad every position to the batch's largest d_t and mask (N·k memory)."""
    starts = bounds[token_ids]
    rows = bounds[token_ids + 1] - starts
    width = int(rows.max()) if rows.numel() else 0
    offsets = torch.arange(width, device=x.device)
    valid = offsets[None, :] < rows[:, None]
    row_index = torch.where(valid, starts[:, None] + offsets[None, :], starts[:, None])
    scores = torch.einsum("nd,nkd->nk", x, keys[row_index])
    weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.einsum("nk,nke->ne", weights, values[row_index])


@dataclass
class BlockChunk:
    """A batch of same-shaped blocks: `tokens` unique ids, each with ≤ C positions and ≤ B rows.

    Padded slots point at a valid index (so gathers stay in bounds) and are masked. The
    flat index lists of the valid slots are made once with the plan, so the forward and
    backward passes scatter results with `index_select`/`index_copy_` instead of boolean
    masks (each of which would cost a `nonzero`, a host sync, per chunk and pass).
    """

    positions: Tensor  # (tokens, C) original position of each slot
    position_valid: Tensor  # (tokens, C)
    rows: Tensor  # (tokens, B) row of the K/V tables for each slot
    row_valid: Tensor  # (tokens, B)
    valid_slots: Tensor  # indices of the valid slots in positions.flatten()
    valid_positions: Tensor  # positions.flatten()[valid_slots]
    valid_row_slots: Tensor  # indices of the valid slots in rows.flatten()
    valid_rows: Tensor  # rows.flatten()[valid_row_slots]


@dataclass
class BlockPlan:
    """How a batch of token ids splits into block-diagonal chunks; depends on ids only."""

    num_positions: int
    chunks: list[BlockChunk]


def plan_blocks(token_ids: Tensor, bounds: Tensor, max_elements_per_chunk: int = DEFAULT_MAX_ELEMENTS_PER_CHUNK,
                feature_width: int = 0) -> BlockPlan:
    """Sort positions by token id and group the unique tokens into padded chunks.

    Unique tokens are bucketed by (⌈log2 d_t⌉, ⌈log2 count⌉) so a bucket pads each axis
    by less than 2×; each bucket is cut into chunks of at most `max_elements_per_chunk`
    elements: a block of C positions and B rows counts C·B scores plus (C + B)·
    `feature_width` gathered features (d_in + d_emb; 0 counts scores only). A token whose
    own block is larger is first split by positions, so the only block that can exceed the
    budget is a single position of a token whose rows alone exceed it.
    """
    token_ids = token_ids.reshape(-1)
    sorted_ids, order = torch.sort(token_ids, stable=True)
    unique_ids, token_counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    token_row_counts = bounds[unique_ids + 1] - bounds[unique_ids]
    token_position_starts = torch.cumsum(token_counts, 0) - token_counts
    # A frequent token with many rows alone can exceed the budget: split its positions into
    # pieces that each fit (pieces of one token share its rows; their gradients add up).
    per_piece = ((max_elements_per_chunk - token_row_counts * feature_width)
                 // (token_row_counts + feature_width)).clamp_min(1)
    pieces = (token_counts + per_piece - 1) // per_piece
    piece_token = torch.repeat_interleave(torch.arange(len(unique_ids), device=token_ids.device), pieces)
    piece_index = torch.arange(len(piece_token), device=token_ids.device) - torch.repeat_interleave(
        torch.cumsum(pieces, 0) - pieces, pieces)
    position_starts = token_position_starts[piece_token] + piece_index * per_piece[piece_token]
    counts = torch.minimum(per_piece[piece_token], token_counts[piece_token] - piece_index * per_piece[piece_token])
    row_starts = bounds[unique_ids][piece_token]
    row_counts = token_row_counts[piece_token]
    # ceil(log2(n)) for n >= 1, computed exactly on integers.
    row_bucket = torch.ceil(torch.log2(row_counts.double())).long()
    count_bucket = torch.ceil(torch.log2(counts.double())).long()
    bucket_key = row_bucket * 64 + count_bucket
    chunks = []
    for key in torch.unique(bucket_key).tolist():
        members = torch.nonzero(bucket_key == key).flatten()
        width = int(row_counts[members].max())
        depth = int(counts[members].max())
        per_chunk = max(1, max_elements_per_chunk // (width * depth + (width + depth) * feature_width))
        for first in range(0, members.numel(), per_chunk):
            chosen = members[first:first + per_chunk]
            chunks.append(_padded_chunk(order, position_starts[chosen], counts[chosen], depth,
                                        row_starts[chosen], row_counts[chosen], width))
    return BlockPlan(num_positions=token_ids.numel(), chunks=chunks)


def _padded_chunk(order: Tensor, position_starts: Tensor, counts: Tensor, depth: int,
                  row_starts: Tensor, row_counts: Tensor, width: int) -> BlockChunk:
    slot = torch.arange(depth, device=order.device)
    position_valid = slot[None, :] < counts[:, None]
    sorted_slot = position_starts[:, None] + torch.where(position_valid, slot[None, :], 0)
    row = torch.arange(width, device=order.device)
    row_valid = row[None, :] < row_counts[:, None]
    rows = row_starts[:, None] + torch.where(row_valid, row[None, :], 0)
    positions = order[sorted_slot]
    valid_slots = torch.nonzero(position_valid.flatten()).flatten()
    valid_row_slots = torch.nonzero(row_valid.flatten()).flatten()
    return BlockChunk(positions, position_valid, rows, row_valid, valid_slots, positions.flatten()[valid_slots],
                      valid_row_slots, rows.flatten()[valid_row_slots])


def _valid(chunk_values: Tensor, slots: Tensor) -> Tensor:
    """The entries of a (tokens, slots, ...) chunk result at the flat valid `slots`."""
    return chunk_values.flatten(0, 1).index_select(0, slots)


def _softmax_dtype(x: Tensor) -> torch.dtype:
    """Softmax statistics in at least fp32 (bf16 scores lose the max), fp64 kept as is."""
    return torch.promote_types(x.dtype, torch.float32)


def _chunk_scores(chunk: BlockChunk, x_blocks: Tensor, key_blocks: Tensor) -> tuple[Tensor, Tensor]:
    """A chunk's scores (blocks already in the compute dtype): unmasked, and with the padded
    rows at -inf."""
    scores = torch.bmm(x_blocks, key_blocks.transpose(1, 2))
    return scores, scores.masked_fill(~chunk.row_valid[:, None, :], float("-inf"))


def _gather(chunk: BlockChunk, x: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The chunk's positions and its key and value rows in the compute dtype (fp32 for bf16
    inputs: scores, softmax and their gradients are computed in fp32, as in the Triton
    kernel); the rows are gathered once when the tables are tied (the same tensor)."""
    dtype = _softmax_dtype(x)
    key_blocks = keys[chunk.rows].to(dtype)
    value_blocks = key_blocks if values is keys else values[chunk.rows].to(dtype)
    return x[chunk.positions].to(dtype), key_blocks, value_blocks


class _SortedRowAttention(torch.autograd.Function):
    """Block-diagonal row attention with recomputation in backward (FlashAttention-style)."""

    @staticmethod
    def forward(ctx, x: Tensor, keys: Tensor, values: Tensor, plan: BlockPlan) -> tuple[Tensor, Tensor]:
        # In the compute dtype: backward's softmax identity uses the output itself (Σ_r P·dP =
        # dA·A), and a bf16-rounded A would cost it most of its precision.
        out = torch.zeros(plan.num_positions, values.shape[1], dtype=_softmax_dtype(x), device=x.device)
        log_norm = torch.zeros(plan.num_positions, dtype=_softmax_dtype(x), device=x.device)
        entropy = torch.zeros_like(log_norm)
        for chunk in plan.chunks:
            x_blocks, key_blocks, value_blocks = _gather(chunk, x, keys, values)
            raw_scores, scores = _chunk_scores(chunk, x_blocks, key_blocks)
            chunk_log_norm = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - chunk_log_norm[..., None])
            chunk_out = torch.bmm(probs, value_blocks)
            # H = log Z - Σ p·s; padded rows have p = 0, so their (finite) raw score adds nothing.
            chunk_entropy = chunk_log_norm - (probs * raw_scores).sum(-1)
            out.index_copy_(0, chunk.valid_positions, _valid(chunk_out, chunk.valid_slots))
            log_norm.index_copy_(0, chunk.valid_positions, _valid(chunk_log_norm, chunk.valid_slots))
            entropy.index_copy_(0, chunk.valid_positions, _valid(chunk_entropy, chunk.valid_slots))
        ctx.save_for_backward(x, keys, values, out, log_norm)
        ctx.plan, ctx.tied = plan, values is keys
        ctx.mark_non_differentiable(entropy)
        return out.to(x.dtype), entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_entropy: Tensor):
        x, keys, values, out, log_norm = ctx.saved_tensors
        tied = ctx.tied
        if tied:
            values = keys  # unpacking the saved tensors may give two objects for the one table
        grad_x = torch.zeros_like(x)
        # Row gradients sum many positions' contributions: accumulated in the compute dtype
        # (fp32 for bf16 tables). Tied tables: both gradients go into one buffer, returned
        # once (no second table-sized sum).
        grad_keys = torch.zeros_like(keys, dtype=_softmax_dtype(x))
        grad_values = grad_keys if tied else torch.zeros_like(values, dtype=_softmax_dtype(x))
        grad_out = grad_out.contiguous()
        for chunk in ctx.plan.chunks:
            x_blocks, key_blocks, value_blocks = _gather(chunk, x, keys, values)
            _, scores = _chunk_scores(chunk, x_blocks, key_blocks)
            probs = torch.exp(scores - log_norm[chunk.positions][..., None])
            # Padded position slots duplicate a real position: zero their incoming
            # gradient so they add nothing to the key/value gradients.
            grad_blocks = (grad_out[chunk.positions] * chunk.position_valid[..., None]).to(probs.dtype)
            grad_probs = torch.bmm(grad_blocks, value_blocks.transpose(1, 2))
            # softmax backward: dS = P ⊙ (dP − Σ_r P·dP), with Σ_r P·dP = dA · A.
            row_dot = (grad_blocks * out[chunk.positions]).sum(-1)
            grad_scores = probs * (grad_probs - row_dot[..., None])
            grad_x.index_copy_(0, chunk.valid_positions,
                               _valid(torch.bmm(grad_scores, key_blocks), chunk.valid_slots).to(x.dtype))
            # dK = dSᵀ·X and dV = Pᵀ·dA; for tied tables their sum, added to the rows once.
            grad_key_rows = torch.bmm(grad_scores.transpose(1, 2), x_blocks)
            grad_value_rows = torch.bmm(probs.transpose(1, 2), grad_blocks)
            if tied:
                grad_keys.index_add_(0, chunk.valid_rows, _valid(grad_key_rows.add_(grad_value_rows),
                                                                 chunk.valid_row_slots))
            else:
                grad_keys.index_add_(0, chunk.valid_rows, _valid(grad_key_rows, chunk.valid_row_slots))
                grad_values.index_add_(0, chunk.valid_rows, _valid(grad_value_rows, chunk.valid_row_slots))
        return grad_x, grad_keys.to(keys.dtype), None if tied else grad_values.to(values.dtype), None


RowPlan = Union[BlockPlan, CpuPlan, "TritonPlan"]  # what `plan_lookup` returns: one per implementation

IMPLEMENTATIONS = ("auto", "torch", "cpu")


def plan_lookup(token_ids: Tensor, bounds: Tensor, feature_width: int = 0,
                max_elements_per_chunk: int = DEFAULT_MAX_ELEMENTS_PER_CHUNK,
                table_dtype: torch.dtype = torch.float32, implementation: str = "auto",
                row_sparse_gradients: bool = False) -> RowPlan:
    """Everything the row attention of `token_ids` needs that depends on the ids alone: the
    groups of the CPU kernel (CPU ids, fp32 tables of `table_dtype`), the kernels' work lists
    (Triton path, for CUDA ids when Triton is available), else the sort, the blocks and their
    chunks of the torch path (`implementation="torch"` asks for it anywhere, "cpu" for the
    CPU kernel). Building it reads data-dependent sizes on the host (synchronising a GPU), so
    it is built once per micro-batch and shared by every L³ layer and by backward
    (l3train.model.l3_layer.LookupRoutes); `attend` then needs none. `feature_width` = d_in +
    d_emb sizes the torch path's chunks (see `plan_blocks`). `row_sparse_gradients`: the CPU
    kernel gives the tables row-sparse gradients (for an optimizer that steps them,
    l3train.row_adamw); the other paths always give table-shaped ones."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "cpu" and (token_ids.is_cuda or not cpu_kernel_available()):
        raise L3TrainError("implementation='cpu' needs CPU tensors and the CPU kernel built (a C compiler); "
                           "use implementation='auto'")
    if implementation == "cpu" or (implementation == "auto" and not token_ids.is_cuda
                                   and table_dtype == torch.float32 and cpu_kernel_available()):
        return plan_cpu(token_ids, bounds, row_sparse_gradients)
    if token_ids.is_cuda and implementation == "auto":
        # Imported only here so CPU users never load Triton or compile its kernels.
        from l3train.model.l3_triton import plan_triton, triton_available
        if triton_available():
            return plan_triton(token_ids, bounds)
    return plan_blocks(token_ids, bounds, max_elements_per_chunk, feature_width)


def attend(x: Tensor, keys: Tensor, values: Tensor, plan: RowPlan) -> tuple[Tensor, Tensor]:
    """Row attention of the positions `plan` was made for (`plan_lookup`): (N, d_emb) outputs
    and (N,) softmax entropies (no gradient). No host synchronisation."""
    if isinstance(plan, BlockPlan):
        return _SortedRowAttention.apply(x, keys, values, plan)
    if isinstance(plan, CpuPlan):
        return cpu_attend(x, keys, values, plan)
    from l3train.model.l3_triton import triton_attend
    return triton_attend(x, keys, values, plan)


def row_attention_with_entropy(x: Tensor, token_ids: Tensor, bounds: Tensor, keys: Tensor, values: Tensor,
                               max_elements_per_chunk: int = DEFAULT_MAX_ELEMENTS_PER_CHUNK,
                               implementation: str = "auto") -> tuple[Tensor, Tensor]:
    """Sorted block-diagonal row attention; also returns each position's softmax entropy.

    x: (N, d_in), token_ids: (N,), bounds: (vocab+1,), keys: (v, d_in), values: (v, d_emb).
    Returns (N, d_emb) outputs and (N,) entropies (no gradient). Plans and attends in one
    call; a model plans once per micro-batch instead (`plan_lookup`, `attend`).
    """
    return attend(x, keys, values, plan_lookup(token_ids.reshape(-1), bounds, x.shape[1] + values.shape[1],
                                               max_elements_per_chunk, keys.dtype, implementation))


def row_attention(x: Tensor, token_ids: Tensor, bounds: Tensor, keys: Tensor, values: Tensor,
                  max_elements_per_chunk: int = DEFAULT_MAX_ELEMENTS_PER_CHUNK, implementation: str = "auto") -> Tensor:
    """Sorted block-diagonal row attention (see the module docstring)."""
    return row_attention_with_entropy(x, token_ids, bounds, keys, values, max_elements_per_chunk, implementation)[0]
