"""Differentiable collectives shared by the sharded L³ rows and expert parallelism.

The all-to-alls are labelled `all_to_all` for the profiler (`training.profile_steps`), in
forward and backward, so a step's time breakdown shows the exchange apart from compute."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class SumOverGroup(torch.autograd.Function):
    """Forward: all-reduce sum over `group`; backward: identity (the gradient is replicated)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class ReplicatedInput(torch.autograd.Function):
    """Forward: identity; backward: all-reduce sum over `group` (each rank used part of x)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class AllToAll(torch.autograd.Function):
    """Differentiable all-to-all of rows; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, tensor: Tensor, send_counts: list[int], recv_counts: list[int], group) -> Tensor:
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        output = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
        with torch.profiler.record_function("all_to_all"):
            dist.all_to_all_single(output, tensor.contiguous(), recv_counts, send_counts, group=group)
        return output

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_input = grad.new_empty((sum(ctx.send_counts), *grad.shape[1:]))
        with torch.profiler.record_function("all_to_all"):
            dist.all_to_all_single(grad_input, grad.contiguous(), ctx.send_counts, ctx.recv_counts,
                                   group=ctx.group)
        return grad_input, None, None, None


def exchange(tensor: Tensor, send_counts: list[int], recv_counts: list[int], group) -> Tensor:
    """All-to-all of rows: rows [sum(send[:i]), sum(send[:i+1])) go to rank i of `group`."""
    return AllToAll.apply(tensor, send_counts, recv_counts, group)
