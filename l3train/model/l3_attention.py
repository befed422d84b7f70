"""The row attention at the heart of L³: a_p = V_tᵀ softmax(K_t x_p) for each position p.

Token t owns the contiguous rows `bounds[t]:bounds[t+1]` of the key table K (v × d_in)
and the value table V (v × d_emb). Every position is independent and its rows are known
from its token id alone, so a batch can be reorganised freely before the layer runs.

Implementations, all with the same signature `(x, token_ids, bounds, keys, values)`:

- `row_attention_loop`: one position at a time. Obviously correct, slow; tests only.
- `row_attention_padded`: gather every position's rows padded to the batch's largest
  d_t. This is the memory-hungry approach the sorted kernel avoids (N·k scores and
  N·k·d gathered rows at k = 512); kept as the benchmark baseline.
- `row_attention`: the training implementation. Positions are sorted by token id so
  equal ids become contiguous; each unique token's positions attend only to that
  token's rows (the score matrix is block diagonal). Blocks are grouped into buckets of
  similar (rows, positions) shape so each bucket is one batched matmul; padding inside
  a bucket is at most 2× per axis, never up to k. The autograd function stores only
  x, the output and the per-position log-sum-exp, and recomputes scores in backward
  (as FlashAttention does), so memory between forward and backward is O(N·d); scores
  exist one bounded chunk at a time. For CUDA inputs with Triton available,
  `row_attention_with_entropy` (hence `row_attention`) dispatches to the fused kernel in
  `l3_triton.py` instead; `max_scores_per_chunk` does not apply there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Largest number of score entries (positions × rows) materialised at once by the
# sorted implementation; bounds its transient memory independently of batch size.
DEFAULT_MAX_SCORES_PER_CHUNK = 1 << 21


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

    Padded slots point at a valid index (so gathers stay in bounds) and are masked.
    """

    positions: Tensor  # (tokens, C) original position of each slot
    position_valid: Tensor  # (tokens, C)
    rows: Tensor  # (tokens, B) row of the K/V tables for each slot
    row_valid: Tensor  # (tokens, B)


@dataclass
class BlockPlan:
    """How a batch of token ids splits into block-diagonal chunks; depends on ids only."""

    num_positions: int
    chunks: list[BlockChunk]


def plan_blocks(token_ids: Tensor, bounds: Tensor, max_scores_per_chunk: int = DEFAULT_MAX_SCORES_PER_CHUNK) -> BlockPlan:
    """Sort positions by token id and group the unique tokens into padded chunks.

    Unique tokens are bucketed by (⌈log2 d_t⌉, ⌈log2 count⌉) so a bucket pads each axis
    by less than 2×; each bucket is cut into chunks of at most `max_scores_per_chunk`
    score entries. A token whose own block is larger is first split by positions, so the
    only block that can exceed the budget is a single position with d_t > budget rows.
    """
    token_ids = token_ids.reshape(-1)
    sorted_ids, order = torch.sort(token_ids, stable=True)
    unique_ids, token_counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    token_row_counts = bounds[unique_ids + 1] - bounds[unique_ids]
    token_position_starts = torch.cumsum(token_counts, 0) - token_counts
    # A frequent token with many rows alone can exceed the budget: split its positions into
    # pieces that each fit (pieces of one token share its rows; their gradients add up).
    per_piece = (max_scores_per_chunk // token_row_counts).clamp_min(1)
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
        per_chunk = max(1, max_scores_per_chunk // (width * depth))
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
    return BlockChunk(order[sorted_slot], position_valid, rows, row_valid)


def _softmax_dtype(x: Tensor) -> torch.dtype:
    """Softmax statistics in at least fp32 (bf16 scores lose the max), fp64 kept as is."""
    return torch.promote_types(x.dtype, torch.float32)


def _chunk_probabilities(chunk: BlockChunk, x: Tensor, keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Scores (fp32, masked) of a chunk's positions against its rows, and gathered x."""
    x_blocks = x[chunk.positions]
    scores = torch.bmm(x_blocks, keys[chunk.rows].transpose(1, 2)).to(_softmax_dtype(x))
    scores = scores.masked_fill(~chunk.row_valid[:, None, :], float("-inf"))
    return scores, x_blocks, chunk.position_valid


class _SortedRowAttention(torch.autograd.Function):
    """Block-diagonal row attention with recomputation in backward (FlashAttention-style)."""

    @staticmethod
    def forward(ctx, x: Tensor, keys: Tensor, values: Tensor, plan: BlockPlan) -> tuple[Tensor, Tensor]:
        out = x.new_zeros(plan.num_positions, values.shape[1])
        log_norm = torch.zeros(plan.num_positions, dtype=_softmax_dtype(x), device=x.device)
        entropy = torch.zeros_like(log_norm)
        for chunk in plan.chunks:
            scores, _, valid = _chunk_probabilities(chunk, x, keys)
            chunk_log_norm = torch.logsumexp(scores, dim=-1)
            probs = torch.exp(scores - chunk_log_norm[..., None])
            chunk_out = torch.bmm(probs.to(values.dtype), values[chunk.rows])
            # H = log Z - Σ p·s; masked rows have p = 0 (their -inf score is zeroed first).
            chunk_entropy = chunk_log_norm - (probs * scores.masked_fill(probs == 0, 0)).sum(-1)
            positions = chunk.positions[valid]
            out[positions] = chunk_out[valid]
            log_norm[positions] = chunk_log_norm[valid]
            entropy[positions] = chunk_entropy[valid]
        ctx.save_for_backward(x, keys, values, out, log_norm)
        ctx.plan = plan
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_entropy: Tensor):
        x, keys, values, out, log_norm = ctx.saved_tensors
        grad_x = torch.zeros_like(x)
        grad_keys = torch.zeros_like(keys)
        grad_values = torch.zeros_like(values)
        grad_out = grad_out.contiguous()
        for chunk in ctx.plan.chunks:
            scores, x_blocks, valid = _chunk_probabilities(chunk, x, keys)
            probs = torch.exp(scores - log_norm[chunk.positions][..., None])
            # Padded position slots duplicate a real position: zero their incoming
            # gradient so they add nothing to the key/value gradients.
            grad_blocks = grad_out[chunk.positions] * valid[..., None]
            value_blocks = values[chunk.rows]
            grad_probs = torch.bmm(grad_blocks, value_blocks.transpose(1, 2)).to(probs.dtype)
            # softmax backward: dS = P ⊙ (dP − Σ_r P·dP), with Σ_r P·dP = dA · A.
            row_dot = (grad_blocks.to(probs.dtype) * out[chunk.positions].to(probs.dtype)).sum(-1)
            grad_scores = (probs * (grad_probs - row_dot[..., None])).to(x.dtype)
            positions = chunk.positions[valid]
            grad_x[positions] = torch.bmm(grad_scores, keys[chunk.rows])[valid]
            rows = chunk.rows[chunk.row_valid]
            grad_keys.index_add_(0, rows, torch.bmm(grad_scores.transpose(1, 2), x_blocks)[chunk.row_valid])
            grad_values.index_add_(
                0, rows, torch.bmm(probs.to(values.dtype).transpose(1, 2), grad_blocks)[chunk.row_valid])
        return grad_x, grad_keys, grad_values, None


def row_attention_with_entropy(x: Tensor, token_ids: Tensor, bounds: Tensor, keys: Tensor, values: Tensor,
                               max_scores_per_chunk: int = DEFAULT_MAX_SCORES_PER_CHUNK) -> tuple[Tensor, Tensor]:
    """Sorted block-diagonal row attention; also returns each position's softmax entropy.

    x: (N, d_in), token_ids: (N,), bounds: (vocab+1,), keys: (v, d_in), values: (v, d_emb).
    Returns (N, d_emb) outputs and (N,) entropies (no gradient).
    """
    if x.is_cuda:
        # Imported only here so CPU users never load Triton or compile its kernels.
        from l3train.model.l3_triton import triton_available, triton_row_attention_with_entropy
        if triton_available():
            return triton_row_attention_with_entropy(x, token_ids, bounds, keys, values)
    plan = plan_blocks(token_ids, bounds, max_scores_per_chunk)
    return _SortedRowAttention.apply(x, keys, values, plan)


def row_attention(x: Tensor, token_ids: Tensor, bounds: Tensor, keys: Tensor, values: Tensor,
                  max_scores_per_chunk: int = DEFAULT_MAX_SCORES_PER_CHUNK) -> Tensor:
    """Sorted block-diagonal row attention (see the module docstring)."""
    return row_attention_with_entropy(x, token_ids, bounds, keys, values, max_scores_per_chunk)[0]
