"""Fused Triton kernels for the L³ row attention: the GPU path of `row_attention_with_entropy`.

Same semantics as `l3_attention`: position p with token t attends over the rows
`bounds[t]:bounds[t+1]` that t owns, a_p = V_tᵀ softmax(K_t x_p), and also reports the
entropy of that softmax (no gradient).

Design (FlashAttention-style, specialised to a block-diagonal score matrix):

- Plan, with torch ops on the device: positions are sorted by token id and every unique
  token becomes one CSR segment: its sorted positions `[pos_start, pos_start+pos_count)`
  and its rows `[row_start, row_start+row_count)`. Work lists cut each segment into
  pieces of ≤ BLOCK_P positions (forward, dx) or ≤ BLOCK_R rows (dK/dV) with
  `repeat_interleave`: no Python loop over tokens and no padding to k; a token with one
  position and one row costs one small program. The lists are ordered by decreasing work
  (longest-processing-time first) so the few heavy tokens do not form a tail. Kernels
  read positions through the sort permutation and write results straight to the original
  positions, so x and the gradients are never permuted or copied.
- Forward, one program per position tile: loop over the token's rows in BLOCK_R blocks
  with an online softmax (running max, normaliser, and Σ e^{s−m}·s for the entropy
  H = lse − Σ p·s). Scores exist one BLOCK_P × BLOCK_R tile at a time. Saved for
  backward: out and the per-position log-sum-exp (fp32; fp64 for fp64 inputs), O(N·d)
  and independent of k.
- Wide features (d_in, d_emb are ~512-2048 in the paper's models, far wider than a
  register tile): each row block's scores are reduced over d_in in BLOCK_F chunks once,
  then the output is produced chunk by chunk. A program's partial sums for one chunk are
  carried to its next row block through a private fp32 scratch slice (`_carry`), so no
  accumulator is wider than BLOCK_F and nothing is recomputed per feature chunk (a grid
  axis over feature chunks would recompute the scores d/BLOCK_F times). Programs whose
  loop has a single iteration (tokens with ≤ BLOCK_R rows) never touch the scratch;
  only the others get a slice.
- Backward recomputes scores from the saved log-sum-exp; two kernels, no atomics:
  * dx: one program per position tile, looping over the token's rows.
  * dK/dV: a 2-D grid of row blocks × position chunks. A program sums the gradient of
    BLOCK_R rows of one token over at most `position_chunk` of that token's positions,
    so the most frequent token (7-10% of all positions in the paper's data) is spread
    over many programs instead of looping on the 1-16 that own its rows. A token whose
    positions fit one chunk has one program per row block, which stores its gradient
    rows plainly (every row belongs to one token: no atomics). Longer tokens write one
    fp32 partial per chunk, and a second kernel sums each row block's partials in chunk
    order: deterministic, and fine for bf16 (the interpreter has no bf16 atomics). The
    partials take (chunks of long tokens) × BLOCK_R × (d_in + d_emb) × 4 bytes: at most
    ≈ (N / position_chunk) · k · (d_in + d_emb) · 4 for N positions and k rows per token.
    Rows of tokens absent from the batch keep their zero gradient.
- Precision: tiles are upcast to fp32 (fp64 for fp64 inputs) before every product; the
  interpreter's bf16 `tl.dot` is wrong, and softmax statistics need fp32 anyway. fp32
  inputs use IEEE products unless torch allows TF32 matmuls, matching what torch does;
  bf16/fp16 inputs use TF32, which represents them exactly.
- `tl.dot` needs every tile dimension ≥ 16 on GPUs; `_mm` decides statically from the
  block shapes and falls back to a broadcast multiply-and-sum for smaller tiles (tiny
  feature widths, or small blocks chosen by the caller).
- No `@triton.autotune` (it needs a driver, so it cannot run under TRITON_INTERPRET):
  tile sizes and warps are an explicit `KernelConfig`, tunable by the caller and by
  tools/bench_l3_gpu.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


def triton_available() -> bool:
    """True when the kernels can run: a CUDA device, or the interpreter (TRITON_INTERPRET=1)."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and warps per program, all powers of two.

    positions per tile, rows per block, feature chunk width (shrunk to the next power of
    two of d_in/d_emb when those are narrower), warps, and the positions one dK/dV program
    sums over (a multiple of the tile, so tiles never straddle two chunks). On sm_90 (checked with ptxas) the defaults
    compile without register spills for bf16 inputs and with a few bytes for fp32 with
    IEEE products; their speed is untuned (tools/bench_l3_gpu.py sweeps alternatives).
    """

    positions: int = 32
    rows: int = 32
    features: int = 32
    num_warps: int = 8
    position_chunk: int = 512

    def __post_init__(self) -> None:
        for name in ("positions", "rows", "features", "num_warps", "position_chunk"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two, got {value}")
        if self.position_chunk < self.positions:
            raise ValueError(f"KernelConfig.position_chunk ({self.position_chunk}) must be at least "
                             f"positions ({self.positions})")


@triton.jit
def _mm(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b; `tl.dot` needs every dimension ≥ 16, smaller tiles multiply and sum."""
    if a.shape[0] >= 16 and a.shape[1] >= 16 and b.shape[1] >= 16:
        # out_dtype explicitly: Triton 3.6 assumes fp32 (and rejects an fp64 accumulator) without it.
        return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    else:
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _carry(partial, carried_scale, out_scale, scratch_ptrs, out_ptrs, mask, first, last):
    """Chain a program's partial sums across its loop iterations through its scratch (fp32; fp64 for fp64).

    result = partial + carried_scale · (what the previous iteration left); the last
    iteration writes result · out_scale to the output, the others to the scratch.
    """
    if not first:
        partial += carried_scale * tl.load(scratch_ptrs, mask=mask, other=0.0)
    if last:
        tl.store(out_ptrs, (partial * out_scale).to(out_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(scratch_ptrs, partial, mask=mask)


@triton.jit
def _segment_positions(order_ptr, segments_ptr, token, first, BLOCK_P: tl.constexpr):
    """Original positions of sorted slots first..first+BLOCK_P of `token`'s segment, and their mask."""
    pos_start = tl.load(segments_ptr + 4 * token + 0)
    pos_count = tl.load(segments_ptr + 4 * token + 1)
    slots = first + tl.arange(0, BLOCK_P)
    mask = slots < pos_count
    positions = tl.load(order_ptr + pos_start + slots, mask=mask, other=0)
    return positions, mask


@triton.jit
def _position_tile(tiles_ptr, order_ptr, segments_ptr, scratch_ptr, scratch_width, BLOCK_P: tl.constexpr):
    """This program's tile: its positions and mask, its scratch block (BLOCK_P × scratch_width),
    and its token's rows (start, count)."""
    tile = tl.program_id(0)
    token = tl.load(tiles_ptr + 3 * tile)
    positions, pos_mask = _segment_positions(order_ptr, segments_ptr, token, tl.load(tiles_ptr + 3 * tile + 1),
                                             BLOCK_P)
    scratch_ptr += tl.load(tiles_ptr + 3 * tile + 2) * (BLOCK_P * scratch_width)
    row_start = tl.load(segments_ptr + 4 * token + 2)
    row_count = tl.load(segments_ptr + 4 * token + 3)
    return positions, pos_mask, scratch_ptr, row_start, row_count


@triton.jit
def _accumulate(weights, source_ptr, source_index, source_mask, WIDTH, scratch_ptr, out_ptr, scratch_index,
                out_index, out_mask, first, last, BLOCK_OUT: tl.constexpr, BLOCK_F: tl.constexpr,
                COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    """out[out_index] (+)= weights · source[source_index], feature chunk by chunk, carrying
    partial sums through this program's scratch (at `scratch_index`) across blocks of the
    summed dimension: rows of a table from positions (dK, dV) or positions from rows (dX)."""
    for f0 in range(0, WIDTH, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        col_mask = cols < WIDTH
        source = tl.load(source_ptr + source_index[:, None] * WIDTH + cols[None, :],
                         mask=source_mask[:, None] & col_mask[None, :], other=0.0).to(COMPUTE)
        partial = _mm(weights, source, tl.zeros((BLOCK_OUT, BLOCK_F), COMPUTE), PRECISION)
        _carry(partial, 1.0, 1.0, scratch_ptr + scratch_index[:, None] * WIDTH + cols[None, :],
               out_ptr + out_index[:, None] * WIDTH + cols[None, :], out_mask[:, None] & col_mask[None, :], first, last)


@triton.jit
def _row_products(a_ptr, b_ptr, positions, pos_mask, rows, row_mask, WIDTH,
                  BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
                  COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_P, BLOCK_R) tile of a[positions] · b[rows] over all WIDTH features, chunk by chunk."""
    acc = tl.zeros((BLOCK_P, BLOCK_R), COMPUTE)
    for f0 in range(0, WIDTH, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        col_mask = cols < WIDTH
        a = tl.load(a_ptr + positions[:, None] * WIDTH + cols[None, :],
                    mask=pos_mask[:, None] & col_mask[None, :], other=0.0).to(COMPUTE)
        b = tl.load(b_ptr + rows[:, None] * WIDTH + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(COMPUTE)
        acc = _mm(a, tl.trans(b), acc, PRECISION)
    return acc


@triton.jit
def _forward_kernel(x_ptr, keys_ptr, values_ptr, out_ptr, lse_ptr, entropy_ptr, scratch_ptr,
                    order_ptr, segments_ptr, tiles_ptr, D_IN, D_EMB,
                    BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DI: tl.constexpr,
                    BLOCK_DE: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    positions, pos_mask, scratch_ptr, row_start, row_count = _position_tile(
        tiles_ptr, order_ptr, segments_ptr, scratch_ptr, D_EMB, BLOCK_P)
    slots = tl.arange(0, BLOCK_P)

    running_max = tl.full((BLOCK_P,), float("-inf"), COMPUTE)
    norm = tl.zeros((BLOCK_P,), COMPUTE)
    weighted = tl.zeros((BLOCK_P,), COMPUTE)  # Σ e^{s−max}·s, rescaled like the normaliser
    for r0 in range(0, row_count, BLOCK_R):
        offsets = r0 + tl.arange(0, BLOCK_R)
        row_mask = offsets < row_count
        rows = row_start + offsets
        scores = _row_products(x_ptr, keys_ptr, positions, pos_mask, rows, row_mask, D_IN,
                               BLOCK_P, BLOCK_R, BLOCK_DI, COMPUTE, PRECISION)
        # Rows past the token's end load as zeros (finite scores); mask them out of the max.
        masked = tl.where(row_mask[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(masked, axis=1))
        # The first block has running_max = -inf: alpha = 0 wipes the empty state.
        alpha = tl.exp(running_max - new_max)
        probs = tl.exp(masked - new_max[:, None])
        norm = norm * alpha + tl.sum(probs, axis=1)
        weighted = weighted * alpha + tl.sum(probs * scores, axis=1)
        running_max = new_max
        # Every token owns ≥ 1 row, so norm ≥ 1 (the maximum contributes e^0).
        inverse_norm = 1.0 / norm
        for e0 in range(0, D_EMB, BLOCK_DE):
            cols = e0 + tl.arange(0, BLOCK_DE)
            col_mask = cols < D_EMB
            values = tl.load(values_ptr + rows[:, None] * D_EMB + cols[None, :],
                             mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(COMPUTE)
            partial = _mm(probs, values, tl.zeros((BLOCK_P, BLOCK_DE), COMPUTE), PRECISION)
            _carry(partial, alpha[:, None], inverse_norm[:, None], scratch_ptr + slots[:, None] * D_EMB + cols[None, :],
                   out_ptr + positions[:, None] * D_EMB + cols[None, :], pos_mask[:, None] & col_mask[None, :],
                   r0 == 0, r0 + BLOCK_R >= row_count)
        tl.debug_barrier()  # the next block reads this block's scratch, maybe from other threads

    lse = running_max + tl.log(norm)
    tl.store(lse_ptr + positions, lse, mask=pos_mask)
    tl.store(entropy_ptr + positions, lse - weighted / norm, mask=pos_mask)


@triton.jit
def _grad_x_kernel(x_ptr, keys_ptr, values_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_x_ptr, scratch_ptr,
                   order_ptr, segments_ptr, tiles_ptr, D_IN, D_EMB,
                   BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DI: tl.constexpr,
                   BLOCK_DE: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    positions, pos_mask, scratch_ptr, row_start, row_count = _position_tile(
        tiles_ptr, order_ptr, segments_ptr, scratch_ptr, D_IN, BLOCK_P)
    slots = tl.arange(0, BLOCK_P)
    lse = tl.load(lse_ptr + positions, mask=pos_mask, other=0.0)
    delta = tl.load(delta_ptr + positions, mask=pos_mask, other=0.0)

    for r0 in range(0, row_count, BLOCK_R):
        offsets = r0 + tl.arange(0, BLOCK_R)
        row_mask = offsets < row_count
        rows = row_start + offsets
        scores = _row_products(x_ptr, keys_ptr, positions, pos_mask, rows, row_mask, D_IN,
                               BLOCK_P, BLOCK_R, BLOCK_DI, COMPUTE, PRECISION)
        probs = tl.where(row_mask[None, :], tl.exp(scores - lse[:, None]), 0.0)
        grad_probs = _row_products(grad_out_ptr, values_ptr, positions, pos_mask, rows, row_mask, D_EMB,
                                   BLOCK_P, BLOCK_R, BLOCK_DE, COMPUTE, PRECISION)
        # softmax backward: dS = P ⊙ (dP − Σ_r P·dP), with Σ_r P·dP = dA · A = delta.
        grad_scores = probs * (grad_probs - delta[:, None])
        # dX = dS·K over this block of rows.
        _accumulate(grad_scores, keys_ptr, rows, row_mask, D_IN, scratch_ptr, grad_x_ptr, slots, positions, pos_mask,
                    r0 == 0, r0 + BLOCK_R >= row_count, BLOCK_P, BLOCK_DI, COMPUTE, PRECISION)
        tl.debug_barrier()


@triton.jit
def _grad_tables_kernel(x_ptr, keys_ptr, values_ptr, grad_out_ptr, lse_ptr, delta_ptr,
                        out_keys_ptr, out_values_ptr, keys_scratch_ptr, values_scratch_ptr,
                        order_ptr, segments_ptr, work_ptr, D_IN, D_EMB, POSITION_CHUNK,
                        BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DI: tl.constexpr,
                        BLOCK_DE: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                        TO_PARTIALS: tl.constexpr):
    """dK, dV of one token's BLOCK_R rows over one chunk of its positions: into the gradient
    rows, or (TO_PARTIALS) into this program's fp32 partial slot, which also carries its sums."""
    item = tl.program_id(0)
    token = tl.load(work_ptr + 4 * item)
    offsets = tl.load(work_ptr + 4 * item + 1) + tl.arange(0, BLOCK_R)
    first_position = tl.load(work_ptr + 4 * item + 2)
    slot_rows = tl.load(work_ptr + 4 * item + 3) * BLOCK_R + tl.arange(0, BLOCK_R)
    end_position = tl.minimum(tl.load(segments_ptr + 4 * token + 1), first_position + POSITION_CHUNK)
    row_mask = offsets < tl.load(segments_ptr + 4 * token + 3)
    rows = tl.load(segments_ptr + 4 * token + 2) + offsets
    if TO_PARTIALS:
        out_rows = slot_rows
    else:
        out_rows = rows

    for p0 in range(first_position, end_position, BLOCK_P):
        positions, pos_mask = _segment_positions(order_ptr, segments_ptr, token, p0, BLOCK_P)
        lse = tl.load(lse_ptr + positions, mask=pos_mask, other=0.0)
        delta = tl.load(delta_ptr + positions, mask=pos_mask, other=0.0)
        scores = _row_products(x_ptr, keys_ptr, positions, pos_mask, rows, row_mask, D_IN,
                               BLOCK_P, BLOCK_R, BLOCK_DI, COMPUTE, PRECISION)
        # Padded position slots must add nothing to this token's row gradients.
        probs = tl.where(pos_mask[:, None] & row_mask[None, :], tl.exp(scores - lse[:, None]), 0.0)
        grad_probs = _row_products(grad_out_ptr, values_ptr, positions, pos_mask, rows, row_mask, D_EMB,
                                   BLOCK_P, BLOCK_R, BLOCK_DE, COMPUTE, PRECISION)
        grad_scores_t = tl.trans(probs * (grad_probs - delta[:, None]))
        probs_t = tl.trans(probs)
        first = p0 == first_position
        last = p0 + BLOCK_P >= end_position
        # dK = dSᵀ·X and dV = Pᵀ·dA for this block of rows.
        _accumulate(grad_scores_t, x_ptr, positions, pos_mask, D_IN, keys_scratch_ptr, out_keys_ptr,
                    slot_rows, out_rows, row_mask, first, last, BLOCK_R, BLOCK_DI, COMPUTE, PRECISION)
        _accumulate(probs_t, grad_out_ptr, positions, pos_mask, D_EMB, values_scratch_ptr, out_values_ptr,
                    slot_rows, out_rows, row_mask, first, last, BLOCK_R, BLOCK_DE, COMPUTE, PRECISION)
        tl.debug_barrier()


@triton.jit
def _sum_partials_kernel(partials_ptr, grad_ptr, segments_ptr, sums_ptr, WIDTH,
                         BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, COMPUTE: tl.constexpr):
    """One row block's gradient: the sum of its chunks' partials, in chunk order (deterministic)."""
    item = tl.program_id(0)
    token = tl.load(sums_ptr + 4 * item)
    offsets = tl.load(sums_ptr + 4 * item + 1) + tl.arange(0, BLOCK_R)
    first_slot = tl.load(sums_ptr + 4 * item + 2)
    chunks = tl.load(sums_ptr + 4 * item + 3)
    row_mask = offsets < tl.load(segments_ptr + 4 * token + 3)
    rows = tl.load(segments_ptr + 4 * token + 2) + offsets
    local_rows = tl.arange(0, BLOCK_R)
    for f0 in range(0, WIDTH, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = row_mask[:, None] & (cols < WIDTH)[None, :]
        total = tl.zeros((BLOCK_R, BLOCK_F), COMPUTE)
        for chunk in range(0, chunks):
            slot_rows = (first_slot + chunk) * BLOCK_R + local_rows
            total += tl.load(partials_ptr + slot_rows[:, None] * WIDTH + cols[None, :], mask=mask, other=0.0)
        tl.store(grad_ptr + rows[:, None] * WIDTH + cols[None, :], total.to(grad_ptr.dtype.element_ty), mask=mask)


@dataclass
class _WorkList:
    """Programs of one kernel: (segment, first offset, scratch slot or -1) each, heaviest first."""

    items: Tensor  # (programs, 3) int64
    scratch_slots: int  # programs that loop more than once and carry partial sums


def _work_list(pieces_of: Tensor, block: int, loop_length: Tensor, loop_block: int) -> _WorkList:
    """Cut segment sizes `pieces_of` into ≤ block pieces with torch ops (no loop over tokens).

    Each piece's program loops over its segment's `loop_length` in `loop_block` steps; the
    work list is ordered by that length (longest first) and programs looping more than
    once get a scratch slot.
    """
    counts = (pieces_of + block - 1) // block
    owner = torch.repeat_interleave(counts)
    first_piece = torch.cumsum(counts, 0) - counts
    first = (torch.arange(owner.numel(), device=owner.device) - first_piece[owner]) * block
    length = loop_length[owner]
    heaviest_first = torch.argsort(length, descending=True, stable=True)
    owner, first, length = owner[heaviest_first], first[heaviest_first], length[heaviest_first]
    loops = length > loop_block
    slot = torch.where(loops, torch.cumsum(loops, 0) - 1, -1)
    return _WorkList(torch.stack([owner, first, slot], 1).contiguous(), int(loops.sum()))


@dataclass
class _TableWork:
    """dK/dV programs (rows: token, row offset, first position, slot), built with the plan."""

    direct: Tensor  # row blocks of tokens whose positions fit one chunk; slot: scratch or -1, heaviest first
    scratch_slots: int  # direct programs looping over more than one tile of positions
    partial: Tensor  # row block × chunk of the longer tokens; slot: its fp32 partial
    sums: Tensor  # one per row block of partials: token, row offset, first slot, chunks


def _table_work(segments: Tensor, config: KernelConfig) -> _TableWork:
    """Cut every token's rows into blocks of `config.rows` and its positions into chunks of
    `config.position_chunk` (torch ops only, no loop over tokens)."""
    pos_count, row_count = segments[:, 1], segments[:, 3]
    blocks = (row_count + config.rows - 1) // config.rows
    owner = torch.repeat_interleave(blocks)
    row_offset = (torch.arange(owner.numel(), device=owner.device) - (torch.cumsum(blocks, 0) - blocks)[owner]) \
        * config.rows
    chunks = (pos_count[owner] + config.position_chunk - 1) // config.position_chunk
    single = chunks == 1
    direct_owner, direct_offset = owner[single], row_offset[single]
    heaviest_first = torch.argsort(pos_count[direct_owner], descending=True, stable=True)
    direct_owner, direct_offset = direct_owner[heaviest_first], direct_offset[heaviest_first]
    loops = pos_count[direct_owner] > config.positions
    direct = torch.stack([direct_owner, direct_offset, torch.zeros_like(direct_owner),
                          torch.where(loops, torch.cumsum(loops, 0) - 1, -1)], 1)
    long_owner, long_offset, long_chunks = owner[~single], row_offset[~single], chunks[~single]
    first_slot = torch.cumsum(long_chunks, 0) - long_chunks
    sums = torch.stack([long_owner, long_offset, first_slot, long_chunks], 1)
    block_of_slot = torch.repeat_interleave(long_chunks)
    slot = torch.arange(block_of_slot.numel(), device=owner.device)
    partial = torch.stack([long_owner[block_of_slot], long_offset[block_of_slot],
                           (slot - first_slot[block_of_slot]) * config.position_chunk, slot], 1)
    return _TableWork(direct.contiguous(), int(loops.sum()), partial.contiguous(), sums.contiguous())


@dataclass
class TritonPlan:
    """CSR description of a batch and the kernels' work lists; depends on token ids and bounds only."""

    order: Tensor  # (N,) original position of each sorted slot
    segments: Tensor  # (U, 4) per unique token: pos_start, pos_count, row_start, row_count
    tiles: _WorkList  # forward and dx programs: position tiles looping over rows
    tables: _TableWork  # dK/dV programs
    config: KernelConfig


def plan_triton(token_ids: Tensor, bounds: Tensor, config: KernelConfig = KernelConfig()) -> TritonPlan:
    """The plan of `token_ids` for the kernels (the host reads its sizes: once per micro-batch)."""
    sorted_ids, order = torch.sort(token_ids.reshape(-1))
    unique_ids, pos_count = torch.unique_consecutive(sorted_ids, return_counts=True)
    row_start = bounds[unique_ids].long()
    row_count = bounds[unique_ids + 1].long() - row_start
    segments = torch.stack([torch.cumsum(pos_count, 0) - pos_count, pos_count, row_start, row_count], 1).contiguous()
    return TritonPlan(order, segments, _work_list(pos_count, config.positions, row_count, config.rows),
                      _table_work(segments, config), config)


def _scratch(slots: int, block: int, width: int, like: Tensor, dtype: torch.dtype) -> Tensor:
    # Never read when no program loops more than once; one element keeps the pointer valid.
    return torch.empty(max(1, slots * block * width), dtype=dtype, device=like.device)


def _feature_block(width: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(width))


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Softmax statistics, scratch and in-kernel math: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _launch_options(x: Tensor, d_emb: int, config: KernelConfig) -> dict:
    if x.dtype == torch.float64:
        compute, precision = tl.float64, "ieee"
    else:
        compute = tl.float32
        # TF32 holds bf16/fp16 inputs exactly; for fp32 inputs follow torch's matmul setting.
        tf32 = x.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
        precision = "tf32" if tf32 else "ieee"
    return dict(BLOCK_P=config.positions, BLOCK_R=config.rows,
                BLOCK_DI=_feature_block(x.shape[1], config.features), BLOCK_DE=_feature_block(d_emb, config.features),
                COMPUTE=compute, PRECISION=precision, num_warps=config.num_warps)


def _table_gradients(x: Tensor, keys: Tensor, values: Tensor, grad_out: Tensor, lse: Tensor, delta: Tensor,
                     plan: TritonPlan) -> tuple[Tensor, Tensor]:
    """dK and dV: direct programs, then the long tokens' partials and their ordered sums."""
    # Zero: rows of tokens absent from the batch get no gradient.
    grad_keys, grad_values = torch.zeros_like(keys), torch.zeros_like(values)
    work, config = plan.tables, plan.config
    d_in, d_emb = x.shape[1], values.shape[1]
    options = _launch_options(x, d_emb, config)
    inputs = (x, keys, values, grad_out, lse, delta)
    if work.direct.shape[0]:
        _grad_tables_kernel[(work.direct.shape[0],)](
            *inputs, grad_keys, grad_values, _scratch(work.scratch_slots, config.rows, d_in, x, lse.dtype),
            _scratch(work.scratch_slots, config.rows, d_emb, x, lse.dtype), plan.order, plan.segments, work.direct,
            d_in, d_emb, config.position_chunk, TO_PARTIALS=False, **options)
    if work.partial.shape[0]:
        partial_keys = _scratch(work.partial.shape[0], config.rows, d_in, x, lse.dtype)
        partial_values = _scratch(work.partial.shape[0], config.rows, d_emb, x, lse.dtype)
        _grad_tables_kernel[(work.partial.shape[0],)](
            *inputs, partial_keys, partial_values, partial_keys, partial_values, plan.order, plan.segments,
            work.partial, d_in, d_emb, config.position_chunk, TO_PARTIALS=True, **options)
        for partials, grad, width, block in ((partial_keys, grad_keys, d_in, options["BLOCK_DI"]),
                                             (partial_values, grad_values, d_emb, options["BLOCK_DE"])):
            _sum_partials_kernel[(work.sums.shape[0],)](partials, grad, plan.segments, work.sums, width,
                                                        BLOCK_R=config.rows, BLOCK_F=block, COMPUTE=options["COMPUTE"])
    return grad_keys, grad_values


class _TritonRowAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, keys: Tensor, values: Tensor, plan: TritonPlan) -> tuple[Tensor, Tensor]:
        x, keys, values = x.contiguous(), keys.contiguous(), values.contiguous()
        n, d_in = x.shape
        d_emb = values.shape[1]
        compute = _compute_dtype(x)
        out = x.new_empty(n, d_emb)
        lse = torch.empty(n, dtype=compute, device=x.device)
        entropy = torch.empty_like(lse)
        if n:
            scratch = _scratch(plan.tiles.scratch_slots, plan.config.positions, d_emb, x, compute)
            _forward_kernel[(plan.tiles.items.shape[0],)](
                x, keys, values, out, lse, entropy, scratch, plan.order, plan.segments, plan.tiles.items,
                d_in, d_emb, **_launch_options(x, d_emb, plan.config))
        ctx.save_for_backward(x, keys, values, out, lse)
        ctx.plan = plan
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_entropy: Tensor):
        x, keys, values, out, lse = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_keys, need_values = ctx.needs_input_grad[:3]
        n, d_in = x.shape
        grad_out = grad_out.contiguous()
        # Σ_r P·dP = dA·A per position: one O(N·d) reduction shared by both kernels.
        delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
        grad_x = grad_keys = grad_values = None
        if need_x:
            grad_x = torch.empty_like(x)
            if n:
                scratch = _scratch(plan.tiles.scratch_slots, plan.config.positions, d_in, x, lse.dtype)
                _grad_x_kernel[(plan.tiles.items.shape[0],)](
                    x, keys, values, grad_out, lse, delta, grad_x, scratch, plan.order, plan.segments,
                    plan.tiles.items, d_in, values.shape[1], **_launch_options(x, values.shape[1], plan.config))
        if need_keys or need_values:
            grad_keys, grad_values = _table_gradients(x, keys, values, grad_out, lse, delta, plan)
        # Tied tables (keys is values) get both gradients; autograd adds them.
        return grad_x, grad_keys if need_keys else None, grad_values if need_values else None, None


def triton_attend(x: Tensor, keys: Tensor, values: Tensor, plan: TritonPlan) -> tuple[Tensor, Tensor]:
    """Fused row attention of the positions `plan` describes (`plan_triton`); also returns each
    position's softmax entropy (no gradient). No host synchronisation.

    x: (N, d_in), keys: (v, d_in), values: (v, d_emb) — pass the same tensor for tied tables;
    all on one device (CUDA, or CPU under TRITON_INTERPRET=1) and of one dtype.
    Returns (N, d_emb) outputs in x's dtype and (N,) entropies (fp32; fp64 for fp64 x).
    """
    if x.dim() != 2 or plan.order.numel() != x.shape[0]:
        raise ValueError(f"x must be (N, d_in) with one token id per row, got x {tuple(x.shape)} "
                         f"and {plan.order.numel()} ids")
    if keys.shape[1] != x.shape[1] or keys.shape[0] != values.shape[0]:
        raise ValueError(f"keys must be (v, d_in={x.shape[1]}) and values (v, d_emb), got keys "
                         f"{tuple(keys.shape)} and values {tuple(values.shape)}")
    if not x.dtype == keys.dtype == values.dtype:
        raise ValueError(f"x, keys and values must share a dtype, got {x.dtype}, {keys.dtype}, {values.dtype}")
    return _TritonRowAttention.apply(x, keys, values, plan)


def triton_row_attention_with_entropy(x: Tensor, token_ids: Tensor, bounds: Tensor, keys: Tensor, values: Tensor,
                                      *, config: KernelConfig = KernelConfig()) -> tuple[Tensor, Tensor]:
    """`triton_attend` with its plan made here (`bounds`: (vocab+1,), every d_t ≥ 1)."""
    return triton_attend(x, keys, values, plan_triton(token_ids, bounds, config))
