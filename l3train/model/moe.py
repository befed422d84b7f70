"""Mixture-of-experts SwiGLU feed-forward: the iso-sparse baseline of the L³ studies.

    gates, experts = softmax over the top-k of W_router x        (per position, fp32)
    y = Σ_{j<k} gates_j · SwiGLU_{experts_j}(x)

Semantics are megatron-core's TopKRouter with its defaults, and the losses are checked
against megatron's own functions in tests/test_moe.py:
- routing in fp32; the gates are the softmax over the k largest logits (equivalently the
  full softmax renormalised over the chosen experts);
- load-balancing loss (Switch Transformer) E · Σ_i f_i · P_i over this rank's micro-batch,
  with f_i the fraction of the T·k assignments routed to expert i (before any capacity
  drop) and P_i the mean full-softmax probability of expert i;
- router z-loss (ST-MoE) mean over positions of logsumexp(logits)²;
- optional capacity: each expert takes at most ceil(capacity_factor · T·k / E) assignments
  of the micro-batch, keeping those with the largest gates (megatron's "probs" drop policy);
  a dropped assignment simply contributes nothing. Without a capacity factor the dispatch
  is dropless.
The forward returns the block's output and its `RouterStats`: the two losses (with
gradient) for the trainer to weight and add to the LM loss, and detached monitoring
figures (load per expert, dropped fraction) that are reduced only when they are logged.

Assignments are sorted by expert and every expert runs one matmul chain on its contiguous
slice (no padding to a capacity unless a capacity factor asks for dropping). The experts'
weights are stacked (E, ...) in the layer's *expert backend* (`self.experts`, the local
`Experts`); expert parallelism (l3train.parallel.expert_parallel) swaps in a backend that
holds a slice of them and dispatches by all-to-all, with the same contract. This module
holds no parallelism.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l3train.config import MoEConfig
from l3train.model.roles import ParamRole


class TopKRouter(nn.Module):
    def __init__(self, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (T, d) → fp32 logits (T, E), gates (T, k) summing to 1, expert ids (T, k)."""
        logits = F.linear(x.float(), self.weight.float())
        top_logits, experts = logits.topk(self.top_k, dim=-1)
        return logits, top_logits.softmax(dim=-1), experts


def load_balancing_loss(logits: Tensor, experts: Tensor) -> Tensor:
    """Switch Transformer's E · Σ_i f_i · P_i; minimal (1) when routing is uniform."""
    num_experts = logits.shape[-1]
    assigned = torch.bincount(experts.flatten(), minlength=num_experts).to(logits.dtype) / experts.numel()
    mean_probability = logits.softmax(dim=-1).mean(dim=0)
    return num_experts * (assigned * mean_probability).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE's z-loss: mean squared log-partition of the router, keeping logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def within_capacity(gates: Tensor, experts: Tensor, num_experts: int, capacity_factor: float) -> Tensor:
    """Mask over the flat assignments: at most ceil(factor · assignments / E) per expert, largest gates first."""
    capacity = math.ceil(capacity_factor * experts.numel() / num_experts)
    by_gate = torch.argsort(gates, descending=True, stable=True)
    order = by_gate[torch.argsort(experts[by_gate], stable=True)]  # by expert, then by gate descending
    counts = torch.bincount(experts, minlength=num_experts)
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(len(order), device=order.device) - first_of_expert[experts[order]]
    keep = torch.zeros_like(experts, dtype=torch.bool)
    keep[order] = rank_in_expert < capacity
    return keep


def run_experts(x: Tensor, counts: list[int], w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """SwiGLU by expert: rows [Σ counts[:e], Σ counts[:e+1]) of `x` go through expert e of the
    stacked weights (w1, w3: (E, hidden, d); w2: (E, d, hidden))."""
    outputs = [F.linear(F.silu(F.linear(rows, w1[e])) * F.linear(rows, w3[e]), w2[e])
               for e, rows in enumerate(x.split(counts)) if rows.shape[0]]
    return torch.cat(outputs) if outputs else x.new_zeros(0, w2.shape[1])


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights, all in this process: the local expert backend."""

    parameter_role = ParamRole.EXPERT

    def __init__(self, num_experts: int, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, d_model))  # gate
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, d_model))  # up
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, hidden))  # down

    def forward(self, x: Tensor, counts: list[int]) -> Tensor:
        return run_experts(x, counts, self.w1, self.w3, self.w2)


class ExpertBackend(Protocol):
    def __call__(self, x: Tensor, counts: list[int]) -> Tensor:
        """Expert outputs for rows `x` sorted by expert, `counts[e]` rows for expert e."""


class RouterStats(NamedTuple):
    """What one MoE block's router did in a forward pass."""

    aux_loss: Tensor  # load-balancing loss, with gradient
    z_loss: Tensor  # router z-loss, with gradient
    load: Tensor  # (E,) fraction of the assignments routed to each expert (before any drop); detached
    dropped_fraction: Tensor  # scalar: assignments dropped by the capacity factor (0 when dropless); detached


class MoEFeedForward(nn.Module):
    """Drop-in for the SwiGLU feed-forward of a decoder block; returns (output, RouterStats)."""

    def __init__(self, d_model: int, moe: MoEConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor = moe.num_experts, moe.top_k, moe.capacity_factor
        self.router = TopKRouter(d_model, moe.num_experts, moe.top_k)
        self.experts: ExpertBackend = Experts(moe.num_experts, d_model, moe.expert_hidden_size)

    def forward(self, x: Tensor) -> tuple[Tensor, RouterStats]:
        flat = x.reshape(-1, x.shape[-1])
        logits, gates, experts = self.router(flat)
        expert, gate = experts.flatten(), gates.flatten()
        load = torch.bincount(expert, minlength=self.num_experts).float().div(expert.numel())
        dropped = load.new_zeros(())
        token = torch.arange(flat.shape[0], device=flat.device).repeat_interleave(self.top_k)
        if self.capacity_factor is not None:
            keep = within_capacity(gate, expert, self.num_experts, self.capacity_factor)
            dropped = 1.0 - keep.float().mean()
            token, expert, gate = token[keep], expert[keep], gate[keep]
        order = torch.argsort(expert, stable=True)
        token, gate = token[order], gate[order]
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        out = self.experts(flat[token], counts)
        combined = torch.zeros_like(flat).index_add(0, token, out * gate.unsqueeze(1).to(out.dtype))
        stats = RouterStats(load_balancing_loss(logits, experts), router_z_loss(logits), load.detach(),
                            dropped.detach())
        return combined.reshape(x.shape), stats


def router_loss(stats: list[RouterStats], moe: MoEConfig) -> Tensor | None:
    """Σ over MoE layers of aux_loss_weight · load balancing + z_loss_weight · z-loss; None
    without MoE layers."""
    terms = [moe.aux_loss_weight * layer.aux_loss + moe.z_loss_weight * layer.z_loss for layer in stats]
    return torch.stack(terms).sum() if terms else None
