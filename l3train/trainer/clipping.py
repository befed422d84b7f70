"""Gradient norms and clipping by the global norm of one process, across DeepSpeed's dense
gradients and the rank-local tensors kept outside it (sharded L³ rows, expert-parallel experts)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from l3train.model.l3_cpu import gradient_rows
from l3train.parallel.sharded_optim import RankLocalParameters
from l3train.parallel.state import ParallelState
from l3train.trainer import deepspeed_adapter

# DeepSpeed clips by dividing by (norm + 1e-6) / threshold; the same epsilon keeps the
# rank-local coefficient identical to the one DeepSpeed applies to the dense gradients.
_CLIP_EPS = 1e-6


def module_grad_norm(model: nn.Module, parallel: ParallelState) -> float:
    """Global norm of `model`'s whole (ZeRO-0, already DP-averaged) gradients; under TP the
    sharded gradients' squares are summed over the TP group, replicated ones counted once."""
    if parallel.tp_size > 1:
        from l3train.parallel.tensor_parallel import tensor_parallel_grad_norm

        return tensor_parallel_grad_norm(model, parallel)
    norms = [gradient_rows(p.grad).detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def scale_module_gradients(model: nn.Module, coefficient: float) -> None:
    """Multiply every gradient of `model` by `coefficient` (one fused pass per dtype and device;
    a row-sparse gradient's rows in place, so that it stays coalesced)."""
    grads = [gradient_rows(p.grad) for p in model.parameters() if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, coefficient)


def clip_module_norm(model: nn.Module, parallel: ParallelState, max_norm: float) -> float:
    """Where l3train clips the engine's gradients (`deepspeed_adapter.clipped_by_l3train`) and
    there are no rank-local tensors: clip by `module_grad_norm`; returns the norm before."""
    norm = module_grad_norm(model, parallel)
    if max_norm > 0 and max_norm / (norm + _CLIP_EPS) < 1.0:
        scale_module_gradients(model, max_norm / (norm + _CLIP_EPS))
    return norm


def clip_global_norm(engine, model: nn.Module, parallel: ParallelState, rank_local: list[RankLocalParameters],
                     max_norm: float, clip_dense: bool = False, riders: torch.Tensor | None = None) -> float:
    """Make this step's clipping that of one process; returns the global norm before clipping.

    Call at the accumulation boundary between the last `engine.backward` and `engine.step()`.
    total = sqrt(dense² + Σ rank-local²) (the rank-local shares are summed over the world,
    each distinct gradient once). DeepSpeed multiplies the dense gradients by
    threshold / (dense + 1e-6) when that is < 1; with threshold = max_norm·(dense + 1e-6)/(total + 1e-6)
    this is the single-process coefficient max_norm / (total + 1e-6), which the rank-local
    tensors get too (with their `gradient_scale`, in the same pass). With `clip_dense`
    (`deepspeed_adapter.clipped_by_l3train`: DeepSpeed's clipping is off) the dense gradients
    are multiplied by that coefficient here instead.

    `riders`: other per-rank values (float32, on the gradients' device) to sum over the world
    in the same all-reduce as the rank-local squares, summed in place: the trainer's step
    agreement travels with the norm (`Trainer._clip_and_agree`).
    """
    for part in rank_local:
        part.prepare_gradients()
    dense = deepspeed_adapter.dense_grad_norm(engine, lambda: module_grad_norm(model, parallel))
    local_squared = torch.zeros((), dtype=torch.float32, device=rank_local[0].params[0].device)
    for part in rank_local:
        local_squared += part.squared_grad_norm()
    packed = local_squared[None] if riders is None else torch.cat([local_squared[None], riders])
    dist.all_reduce(packed)
    if riders is not None:
        riders.copy_(packed[1:])
    total = (dense ** 2 + packed[0].item()) ** 0.5
    coefficient = min(max_norm / (total + _CLIP_EPS), 1.0) if max_norm > 0 else 1.0
    if max_norm > 0:
        if not clip_dense:
            deepspeed_adapter.set_clip_threshold(engine, max_norm * (dense + _CLIP_EPS) / (total + _CLIP_EPS))
        elif coefficient < 1.0:
            scale_module_gradients(model, coefficient)
    for part in rank_local:  # also without clipping: their `gradient_scale`
        part.scale_gradients(coefficient)
    return total
