"""Exact parameter counts and forward FLOPs per token, from the config alone.

Conventions (stated once, used by the sizing searches, tools/model_stats.py and the report):
- total parameters: everything stored (tied weights once). The `bounds` buffer is not a
  parameter.
- active parameters: those a single token touches. Dense parameters count fully
  (embedding and output tables included, the usual convention for dense and MoE
  models); an L³ layer counts only the token's own rows — d_t·d_in keys plus d_t·d_emb
  values (values share the keys when tied) — at the corpus mean d_t (rows per token
  *occurrence*, weighted by frequency), plus W_up, W_mix and its norms.
- FLOPs: forward matmul FLOPs per token, 2 per multiply-accumulate. Attention scores use
  the mean causal context (S+1)/2 for sequence length S: QKᵀ and AV together cost
  2·d_model·(S+1) per layer. An L³ layer costs 2·d_t·(d_in + d_emb) for scores and the
  weighted sum, plus its W_up and W_mix matmuls. Norms, softmax, RoPE and activation
  functions are ignored (they are < 1% at these sizes).
- MoE blocks (`moe.blocks`): the block's SwiGLU (3·d·ffn) is replaced by a router of E·d
  and E SwiGLU experts of 3·d·h each (E = num_experts, h = expert_hidden_size), all
  counted in the total. Active parameters count the router and top_k experts
  (E·d + top_k·3·d·h), as a token touches the whole router and its k experts. Forward
  FLOPs per token are 2·E·d for the router logits plus top_k·2·3·d·h for the experts,
  assuming dropless dispatch (with a capacity factor, dropped assignments cost less; the
  routing bookkeeping — top-k, softmax, sort, gather — is ignored like the norms).
- Training FLOPs (the TFLOP/s and MFU a run logs): `TrainingFlops`, in torchtitan's and
  Megatron-LM's convention (6·N plus full-matrix attention), which differs from the forward
  count above in its attention term and its norms; its docstring says how.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from l3train.config import Config, L3Config, ModelConfig, MoEConfig
from l3train.errors import L3TrainError

if TYPE_CHECKING:
    from l3train.allocation.allocation import Allocation


@dataclass(frozen=True)
class ModelStats:
    total_params: int
    active_params: float
    l3_table_params: int  # the sparse part: all L³ key/value rows
    flops_per_token: float  # forward

    @property
    def sparsity(self) -> float:
        """total / active parameters."""
        return self.total_params / self.active_params


def _decoder_block_params(m: ModelConfig) -> int:
    """A dense block: attention, SwiGLU and its two RMSNorms."""
    head_dim = m.d_model // m.n_heads
    attention = 2 * m.d_model * m.n_heads * head_dim + 2 * m.d_model * m.n_kv_heads * head_dim
    return attention + 3 * m.d_model * m.ffn_hidden_size + 2 * m.d_model


def _moe_ffn_params(m: ModelConfig, moe: MoEConfig, experts: int) -> int:
    """Router plus `experts` SwiGLU experts of one MoE block."""
    return moe.num_experts * m.d_model + experts * 3 * m.d_model * moe.expert_hidden_size


def _l3_dense_params(m: ModelConfig, l3: L3Config) -> int:
    """Per L³ block, everything but the tables: input RMSNorm, W_up, its norm, W_mix."""
    up_norm = 2 * l3.d_up if l3.norm == "layer" else l3.d_up
    return m.d_model + l3.d_emb * l3.d_up + up_norm + (l3.d_up + m.d_model) * m.d_model


def _l3_row_width(m: ModelConfig, l3: L3Config) -> int:
    """Parameters per L³ row: a key of d_in, plus a value of d_emb unless tied."""
    return m.d_model if l3.tied_kv else m.d_model + l3.d_emb


def model_stats(m: ModelConfig, l3: L3Config, seq_length: int, l3_rows: int = 0,
                mean_rows_per_token: float = 0.0, moe: MoEConfig | None = None) -> ModelStats:
    """Counts for a DecoderLM; `l3_rows` is v (rows per L³ layer), `mean_rows_per_token` the corpus
    mean d_t, `moe` the mixture-of-experts settings (None or empty `moe.blocks`: no MoE blocks)."""
    num_l3 = len(l3.after_blocks)
    num_moe = len(moe.blocks) if moe is not None else 0
    dense_ffn = 3 * m.d_model * m.ffn_hidden_size
    embedding = m.vocab_size * m.d_model
    output = 0 if m.tie_embeddings else m.vocab_size * m.d_model
    blocks = m.n_layers * _decoder_block_params(m)
    moe_total = moe_active = moe_flops = 0
    if num_moe:
        moe_total = num_moe * (_moe_ffn_params(m, moe, moe.num_experts) - dense_ffn)
        moe_active = num_moe * (_moe_ffn_params(m, moe, moe.top_k) - dense_ffn)
        moe_flops = num_moe * 2 * (_moe_ffn_params(m, moe, moe.top_k) - dense_ffn)
    l3_dense = num_l3 * _l3_dense_params(m, l3)
    l3_tables = num_l3 * l3_rows * _l3_row_width(m, l3)
    total = embedding + output + blocks + moe_total + l3_dense + l3_tables + m.d_model
    active = (total - l3_tables - (moe_total - moe_active)
              + num_l3 * mean_rows_per_token * _l3_row_width(m, l3))

    head_dim = m.d_model // m.n_heads
    block_matmuls = 2 * m.d_model * (m.n_heads + m.n_kv_heads) * head_dim + dense_ffn
    attention_scores = 2 * m.d_model * (seq_length + 1)
    l3_matmuls = (mean_rows_per_token * (m.d_model + l3.d_emb)
                  + l3.d_emb * l3.d_up + (l3.d_up + m.d_model) * m.d_model)
    flops = (m.n_layers * (2 * block_matmuls + attention_scores) + moe_flops + num_l3 * 2 * l3_matmuls
             + 2 * m.vocab_size * m.d_model)
    return ModelStats(total_params=total, active_params=active, l3_table_params=l3_tables, flops_per_token=flops)


@dataclass(frozen=True)
class TrainingFlops:
    """Model FLOPs of one training step per token (forward + backward), in the convention of
    torchtitan (`get_nparams_and_flops`, formerly `get_num_flop_per_token`) and Megatron-LM,
    so that TFLOP/s and MFU compare with theirs:

        per_token = 6·N + 12·L·H·q·S + 6·n_L3·d_t·(d_in + d_emb)

    - 6·N: N = `dense_params`, the active parameters of `model_stats` (dense matrices, the
      router and top_k experts of MoE blocks, L³ W_up/W_mix, all norm weights) without the
      input embedding (a lookup, no matmul: torchtitan subtracts it) and without the L³
      key/value rows (a table lookup: their cost is the row-attention term). The output
      projection counts, also when tied to the embedding (it is a real matmul; torchtitan
      would drop it with the tied embedding). 2 FLOPs per multiply-accumulate in forward, 4
      in backward.
    - 12·L·H·q·S (`attention`): QKᵀ and AV over the full S×S score matrix (no discount for
      the causal mask, as torchtitan and Megatron count it), L layers, H·q = n_heads ·
      head_dim = d_model, S = data.seq_length; forward 4·L·H·q·S, backward twice that.
    - 6·n_L3·d_t·(d_in + d_emb) (`l3_rows`): each L³ layer's row attention, forward
      2·d_t·(d_in + d_emb) (scores against d_t keys of width d_in = d_model, weighted sum of
      d_t values of width d_emb; counted so also when keys and values are tied), with d_t
      the allocation's corpus mean rows per token occurrence; times 3 for forward + backward.

    Activation recomputation is not counted (these are model FLOPs, not hardware FLOPs). The
    norm weights are in N, as torchtitan counts every parameter but the embedding; the
    elementwise work of norms, softmax, RoPE and activation functions is not counted (as in
    `model_stats`).
    """

    dense_params: float  # N
    attention: float  # 12·L·H·q·S
    l3_rows: float  # 6·n_L3·d_t·(d_in + d_emb)

    @property
    def per_token(self) -> float:
        return 6 * self.dense_params + self.attention + self.l3_rows


def training_flops(m: ModelConfig, l3: L3Config, seq_length: int, mean_rows_per_token: float = 0.0,
                   moe: MoEConfig | None = None) -> TrainingFlops:
    """`TrainingFlops` of a DecoderLM (arguments as `model_stats`'s), from its active parameters."""
    stats = model_stats(m, l3, seq_length, mean_rows_per_token=mean_rows_per_token, moe=moe)
    token_rows = len(l3.after_blocks) * mean_rows_per_token * _l3_row_width(m, l3)
    # Tied: the one table is the output projection (counted); untied: drop the input table.
    input_embedding = 0 if m.tie_embeddings else m.vocab_size * m.d_model
    head_dim = m.d_model // m.n_heads
    return TrainingFlops(dense_params=stats.active_params - token_rows - input_embedding,
                         attention=12 * m.n_layers * m.n_heads * head_dim * seq_length,
                         l3_rows=6 * len(l3.after_blocks) * mean_rows_per_token * (m.d_model + l3.d_emb))


def add_l3_figure_arguments(parser: argparse.ArgumentParser) -> None:
    """`--rows`/`--mean-rows` of the sizing CLIs, read by `l3_figures`."""
    parser.add_argument("--rows", type=int, help="L³ rows v per layer (instead of reading the allocation)")
    parser.add_argument("--mean-rows", type=float, help="corpus mean d_t (instead of reading the allocation)")


def l3_figures(cfg: Config, rows: int | None, mean_rows: float | None) -> tuple[int, float]:
    """(v, corpus mean d_t) for the CLIs: from `--rows`/`--mean-rows`, else from the config's
    allocation file; user errors are one-line L3TrainErrors."""
    if (rows is None) != (mean_rows is None):
        raise L3TrainError("--rows and --mean-rows go together")
    if rows is not None:
        if not 1 <= mean_rows <= rows:
            raise L3TrainError(f"--mean-rows must be in [1, --rows={rows}], got {mean_rows}")
        return rows, mean_rows
    allocation = config_allocation(cfg, "pass --rows and --mean-rows to plan without it")
    return int(allocation.rows_per_token.sum()), allocation.mean_rows_per_token_occurrence()


def config_allocation(cfg: Config, without_it: str) -> Allocation:
    """The allocation `l3.allocation` names, checked against the model's vocabulary; a missing
    file is a one-line error ending in `without_it` (how the CLI can do without it)."""
    from l3train.allocation.allocation import Allocation

    if not Path(cfg.l3.allocation).exists():
        raise L3TrainError(f"l3.allocation {cfg.l3.allocation} not found; build it with tools/lzw_allocate.py "
                           f"or {without_it}")
    return Allocation.load(cfg.l3.allocation, expect_vocab_size=cfg.model.vocab_size)
