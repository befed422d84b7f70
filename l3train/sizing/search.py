"""The baselines an L³ model is compared with: the iso-FLOP dense model and the iso-sparse MoE.

The paper compares an L³ model with a dense model of the same forward FLOPs per token
(iso-FLOP) and with an MoE of the same FLOPs and sparsity (total / active parameters,
iso-sparse). Both are found by searching over backbone shapes with the feed-forward size
solved for the FLOPs, which are linear in it; every figure comes from
`l3train.sizing.accounting` (MoE FLOPs assume dropless dispatch).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from l3train.config import Config, ModelConfig, MoEConfig
from l3train.errors import L3TrainError
from l3train.sizing.accounting import ModelStats, model_stats

# The iso-sparse MoE search aims at both FLOPs and sparsity within this relative distance.
MOE_GOAL = 0.01
MAX_EXPERTS = 128


def ffn_multiple(d_model: int) -> int:
    """SwiGLU size granularity: 8 for toy widths, 256 (tensor-core and TP friendly) from d_model 1024."""
    return 256 if d_model >= 1024 else 8


def dense_stats(m: ModelConfig, seq_length: int) -> ModelStats:
    """Figures of backbone `m` with neither L³ layers nor MoE blocks."""
    return model_stats(m, dataclasses.replace(Config().l3, after_blocks=[]), seq_length)


def moe_stats(m: ModelConfig, moe: MoEConfig, seq_length: int) -> ModelStats:
    """Figures of backbone `m` with the MoE blocks of `moe` and no L³ layers."""
    return model_stats(m, dataclasses.replace(Config().l3, after_blocks=[]), seq_length, moe=moe)


def _reshaped(m: ModelConfig, n_layers: int, n_heads: int, group: int, head_dim: int) -> ModelConfig:
    """`m` with another depth and head count, keeping head size and the grouped-query ratio."""
    return dataclasses.replace(m, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads // group,
                               d_model=n_heads * head_dim)


def iso_flop_dense(m: ModelConfig, seq_length: int, target_flops: float) -> ModelConfig:
    """The dense backbone closest in shape to `m` whose forward FLOPs/token match `target_flops`.

    Head size and the query/KV head ratio are kept; every n_layers in [L, 2L] and
    n_heads in [H, 2H] (a multiple of the group size) is tried with the SwiGLU size solved
    for the FLOPs (they are linear in it) and rounded to `ffn_multiple`. Candidates
    within 1% of the target are ranked by how far the ffn/d_model ratio moves from the
    original's; if none is within 1%, the closest in FLOPs wins.
    """
    head_dim = m.d_model // m.n_heads
    group = m.n_heads // m.n_kv_heads
    base_ratio = m.ffn_hidden_size / m.d_model
    best: tuple[float, float, ModelConfig] | None = None
    for n_layers in range(m.n_layers, 2 * m.n_layers + 1):
        for n_heads in range(m.n_heads, 2 * m.n_heads + 1, group):
            shape = _reshaped(m, n_layers, n_heads, group, head_dim)
            fixed = dense_stats(dataclasses.replace(shape, ffn_hidden_size=0), seq_length).flops_per_token
            per_unit = dense_stats(dataclasses.replace(shape, ffn_hidden_size=1), seq_length).flops_per_token - fixed
            step = ffn_multiple(shape.d_model)
            ffn = round((target_flops - fixed) / per_unit / step) * step
            if ffn < step:
                continue
            candidate = dataclasses.replace(shape, ffn_hidden_size=ffn)
            miss = abs(dense_stats(candidate, seq_length).flops_per_token / target_flops - 1)
            key = (0.0 if miss <= 0.01 else miss, abs(math.log(ffn / shape.d_model / base_ratio)))
            if best is None or key < best[:2]:
                best = (*key, candidate)
    if best is None:
        raise L3TrainError(f"no dense backbone up to {2 * m.n_layers} layers and {2 * m.n_heads} heads "
                           f"reaches {target_flops:,.0f} FLOPs/token")
    return best[2]


def iso_sparse_moe(dense: ModelConfig, seq_length: int, target_flops: float, target_sparsity: float,
                   top_k: int = 2, experts_multiple: int = 1) -> tuple[ModelConfig, MoEConfig]:
    """An all-MoE model with the forward FLOPs/token and the sparsity (total/active) of the L³ model.

    Every block is an MoE block of E experts, top_k active. For a backbone, FLOPs are linear
    in the expert size h, so h is solved for `target_flops` and rounded to `ffn_multiple`;
    the sparsity then follows from E. E runs over the multiples of `experts_multiple` in
    [top_k, MAX_EXPERTS] (a multiple of 8 lets moe.expert_parallel be 8). Integer E and the
    rounding of h make the iso-FLOP dense backbone alone miss the goals by a few percent
    (FLOPs by up to 3% at paper sizes, where h moves in steps of 256), so backbones around
    it are tried too: same head size and grouped-query ratio, n_layers within ±50% and
    n_heads within ±25% of the dense backbone's. Candidates with FLOPs and sparsity both
    within MOE_GOAL of the targets are ranked by how far the backbone moves from the dense
    one (|log| of the layer and head ratios, summed), then by sparsity and FLOPs miss; if none
    meets the goals, the ones missing them least win (FLOPs first, then sparsity).
    `ffn_hidden_size` is kept from `dense` (unused: no block keeps a dense SwiGLU).
    """
    if experts_multiple < 1:
        raise L3TrainError(f"--moe-experts-multiple must be >= 1, got {experts_multiple}")
    first_experts = -(-top_k // experts_multiple) * experts_multiple  # top_k rounded up to the multiple
    head_dim = dense.d_model // dense.n_heads
    group = dense.n_heads // dense.n_kv_heads
    layers0, heads0 = dense.n_layers, dense.n_heads
    min_heads = max(group, -(-(heads0 - heads0 // 4) // group) * group)  # rounded up to the group size
    best: tuple | None = None
    for n_layers in range(max(1, layers0 - layers0 // 2), layers0 + layers0 // 2 + 1):
        for n_heads in range(min_heads, heads0 + heads0 // 4 + 1, group):
            shape = _reshaped(dense, n_layers, n_heads, group, head_dim)
            step = ffn_multiple(shape.d_model)
            distance = abs(math.log(n_layers / layers0)) + abs(math.log(n_heads / heads0))
            for num_experts in range(first_experts, MAX_EXPERTS + 1, experts_multiple):
                moe = MoEConfig(blocks=list(range(n_layers)), num_experts=num_experts, top_k=top_k,
                                expert_hidden_size=0)
                fixed = moe_stats(shape, moe, seq_length).flops_per_token
                per_unit = moe_stats(shape, dataclasses.replace(moe, expert_hidden_size=1),
                                     seq_length).flops_per_token - fixed
                hidden = round((target_flops - fixed) / per_unit / step) * step
                if hidden < step:
                    continue
                moe = dataclasses.replace(moe, expert_hidden_size=hidden)
                stats = moe_stats(shape, moe, seq_length)
                flops_miss = abs(stats.flops_per_token / target_flops - 1)
                sparsity_miss = abs(stats.sparsity / target_sparsity - 1)
                key = (max(flops_miss - MOE_GOAL, 0.0), max(sparsity_miss - MOE_GOAL, 0.0), distance,
                       sparsity_miss, flops_miss)
                if best is None or key < best[0]:
                    best = (key, shape, moe)
    if best is None:
        multiple = f" (a multiple of {experts_multiple})" if experts_multiple > 1 else ""
        raise L3TrainError(f"no MoE with top_k {top_k} and up to {MAX_EXPERTS} experts{multiple} "
                           f"reaches {target_flops:,.0f} FLOPs/token")
    return best[1], best[2]


@dataclass(frozen=True)
class Baselines:
    """An L³ model (at v rows and corpus mean d_t) and its two sized baselines."""

    rows: int
    mean_rows: float
    experts_multiple: int
    l3_stats: ModelStats
    dense: ModelConfig
    dense_stats: ModelStats
    moe_backbone: ModelConfig
    moe: MoEConfig
    moe_stats: ModelStats


def size_baselines(cfg: Config, rows: int, mean_rows: float, top_k: int = 2,
                   experts_multiple: int = 1) -> Baselines:
    """The iso-FLOP dense model and the iso-sparse MoE (top_k of E experts, E a multiple of
    `experts_multiple`) of L³ config `cfg` at v = `rows` and corpus mean d_t = `mean_rows`."""
    seq = cfg.data.seq_length
    l3_stats = model_stats(cfg.model, cfg.l3, seq, rows, mean_rows)
    dense = iso_flop_dense(cfg.model, seq, l3_stats.flops_per_token)
    backbone, moe = iso_sparse_moe(dense, seq, l3_stats.flops_per_token, l3_stats.sparsity, top_k,
                                   experts_multiple)
    return Baselines(rows, mean_rows, experts_multiple, l3_stats, dense, dense_stats(dense, seq), backbone, moe,
                     moe_stats(backbone, moe, seq))
