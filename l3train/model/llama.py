"""Llama-style decoder with Large Lookup Layers between blocks.

    tokens → embedding → [block → (L³ if configured)] × n_layers → RMSNorm → logits

Blocks are pre-norm: h += Attention(RMSNorm(h)); h += FFN(RMSNorm(h)), with RoPE,
grouped-query attention and no biases. FFN is a SwiGLU, or in the blocks listed in
`moe.blocks` a mixture of SwiGLU experts (l3train.model.moe); a model may have both
MoE blocks and L³ layers. An L³ layer after block i reads RMSNorm(h) and
the token ids and adds its output to the residual stream, like any other sublayer, so
a freshly initialised L³ perturbs the stream only slightly.

The forward returns a `ModelOutput`: the logits plus, explicitly, what the L³ layers and
MoE routers report (entropies, router losses and loads) — nothing is left on the modules.

Generation (l3train.inference) passes an optional cache of earlier positions' keys and
values to `DecoderLM.forward`; without one (training) the forward is plain causal attention.

Model code holds no parallelism: `l3train.parallel` swaps in tensor-parallel linears and
the row and expert backends of sharded L³ layers and expert-parallel MoE blocks from outside. Linear weights are named like torchtitan's Llama
(wq/wk/wv/wo, w1/w2/w3) so parallelization plans can address them by name.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l3train.config import L3Config, ModelConfig, MoEConfig
from l3train.model.l3_layer import LargeLookupLayer, LookupRoutes
from l3train.model.moe import MoEFeedForward, RouterStats
from l3train.model.roles import ParamRole, parameter_roles


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables (max_seq_len, head_dim) for rotate-half rotary embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (batch, heads, seq, head_dim) by position; cos/sin are (seq, head_dim), or
    (batch, 1, seq, head_dim) when every sequence has its own positions."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class AttentionCache(Protocol):
    """One block's keys and values of the positions already processed (l3train.inference.kv_cache)."""

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store the new positions' keys and values (batch, kv_heads, seq, head_dim); return the
        keys and values of every position so far and the boolean mask (batch, 1, seq, length)
        of the keys each new position may attend to."""
        ...


class DecoderCache(Protocol):
    """The attention caches of all blocks, for incremental decoding."""

    def extend(self, seq: int) -> Tensor:
        """Make room for `seq` new positions; returns their positions within each sequence (batch, seq)."""
        ...

    def layer(self, block: int) -> AttentionCache:
        """The cache of block `block`."""
        ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: AttentionCache | None = None) -> Tensor:
        batch, seq, _ = x.shape
        # Head counts come from the weights so a tensor-parallel shard (fewer local heads) works unchanged.
        q = self.wq(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        else:
            # The new queries attend to the cached positions too; the mask carries causality and padding.
            k, v, mask = cache.append(k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig | None = None) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.d_model, cfg.ffn_hidden_size) if moe is None else MoEFeedForward(cfg.d_model, moe)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor,
                cache: AttentionCache | None = None) -> tuple[Tensor, RouterStats | None]:
        """The updated residual stream, and the router's stats when the feed-forward is an MoE."""
        h = h + self.attention(self.attention_norm(h), cos, sin, cache)
        if isinstance(self.feed_forward, MoEFeedForward):
            out, router = self.feed_forward(self.ffn_norm(h))
            return h + out, router
        return h + self.feed_forward(self.ffn_norm(h)), None


class LookupBlock(nn.Module):
    """Residual wrapper of an L³ layer: h += L³(RMSNorm(h), token_ids)."""

    def __init__(self, cfg: ModelConfig, l3: L3Config, rows_per_token: np.ndarray) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lookup = LargeLookupLayer(rows_per_token, d_in=cfg.d_model, d_emb=l3.d_emb, d_up=l3.d_up,
                                       tied_kv=l3.tied_kv, norm=l3.norm, norm_eps=cfg.norm_eps,
                                       init_std=cfg.init_std)

    def forward(self, h: Tensor, token_ids: Tensor | LookupRoutes) -> tuple[Tensor, Tensor]:
        """The updated residual stream, and the lookups' mean softmax entropy."""
        out, entropy = self.lookup(self.norm(h), token_ids)
        return h + out, entropy


class ModelOutput(NamedTuple):
    """What `DecoderLM.forward` returns (a NamedTuple, which DeepSpeed's hooks traverse)."""

    logits: Tensor  # (batch, seq, vocab), or this rank's vocabulary slice under TP
    l3_entropy: dict[int, Tensor]  # by the block an L³ layer follows: mean softmax entropy (detached)
    router: dict[int, RouterStats]  # by MoE block index


class DecoderLM(nn.Module):
    """The language model: token ids (batch, seq) → logits (batch, seq, vocab)."""

    def __init__(self, cfg: ModelConfig, l3: L3Config | None = None, rows_per_token: np.ndarray | None = None,
                 moe: MoEConfig | None = None) -> None:
        super().__init__()
        l3, moe = l3 or L3Config(), moe or MoEConfig()
        if l3.after_blocks and rows_per_token is None:
            raise ValueError("L³ layers need rows_per_token (the allocation)")
        if rows_per_token is not None and len(rows_per_token) != cfg.vocab_size:
            raise ValueError(f"allocation covers {len(rows_per_token)} tokens, model vocab is {cfg.vocab_size}")
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, moe if index in moe.blocks else None)
                                    for index in range(cfg.n_layers))
        # Keyed by the block index they follow, so names read "lookups.3" for "after block 3".
        self.lookups = nn.ModuleDict({str(b): LookupBlock(cfg, l3, rows_per_token) for b in sorted(l3.after_blocks)})
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.embedding.weight
        cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, init_std) everywhere; output projections of residual branches scaled down
        by 1/sqrt(2·n_layers) (GPT-2) so the residual stream's variance does not grow with depth."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, param, role in parameter_roles(self):
            if param.is_meta or role in (ParamRole.VECTOR, ParamRole.L3_ROWS):
                continue  # norms keep ones; L³ tables were initialised by their layer
            is_residual_out = name.endswith(("wo.weight", "w2.weight", "experts.w2", "mix.weight"))
            nn.init.normal_(param, std=residual_std if is_residual_out else std)

    def l3_layers(self) -> list[LargeLookupLayer]:
        return [block.lookup for block in self.lookups.values()]

    def moe_layers(self) -> dict[int, MoEFeedForward]:
        """The MoE feed-forwards by block index."""
        return {index: block.feed_forward for index, block in enumerate(self.blocks)
                if isinstance(block.feed_forward, MoEFeedForward)}

    def forward(self, tokens: Tensor, cache: DecoderCache | None = None) -> ModelOutput:
        """Logits of every position of `tokens`; with a `cache`, `tokens` are the next positions
        of the sequences the cache holds (generation), else whole sequences from position 0."""
        seq = tokens.shape[1]
        if cache is None:
            if seq > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {seq} exceeds model.max_seq_len {self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        else:
            # Each sequence has its own positions (prompts of different lengths are padded):
            # angles per (sequence, position), broadcast over the heads.
            positions = cache.extend(seq)
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        h = self.embedding(tokens)
        # Built on first use, once for all L³ layers and for backward.
        routes = LookupRoutes(tokens)
        entropies, routers = {}, {}
        for index, block in enumerate(self.blocks):
            h, router = block(h, cos, sin, None if cache is None else cache.layer(index))
            if router is not None:
                routers[index] = router
            if str(index) in self.lookups:
                h, entropies[index] = self.lookups[str(index)](h, routes)
        return ModelOutput(self.output(self.norm(h)), entropies, routers)
