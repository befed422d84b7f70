"""Differentiable collectives shared by the sharded L³ rows and expert parallelism.

The all-to-alls are labelled `all_to_all` for the profiler (`training.profile_steps`), in
forward and backward, so a step's time breakdown shows the exchange apart from compute.
They go through `all_to_all_single`, which takes shared memory where the group's ranks
share a host (l3train.parallel.shared_memory) and torch.distributed elsewhere."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from l3train.parallel.shared_memory import disable_shared_memory, shared_memory_exchange


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
            all_to_all_single(output, tensor.contiguous(), recv_counts, send_counts, group=group)
        return output

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_input = grad.new_empty((sum(ctx.send_counts), *grad.shape[1:]))
        with torch.profiler.record_function("all_to_all"):
            all_to_all_single(grad_input, grad.contiguous(), ctx.send_counts, ctx.recv_counts, group=ctx.group)
        return grad_input, None, None, None


def all_to_all_single(output: Tensor, input: Tensor, output_split_sizes: list[int] | None = None,
                      input_split_sizes: list[int] | None = None, group=None) -> None:
    """`torch.distributed.all_to_all_single` (synchronous), through shared memory where
    `enable_shared_memory` made that possible for `group`."""
    shared = shared_memory_exchange(group)
    if shared is None or input.device.type != "cpu":
        dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group)
    elif not shared.all_to_all(output, input, output_split_sizes, input_split_sizes):
        disable_shared_memory(group)


def exchange(tensor: Tensor, send_counts: list[int], recv_counts: list[int], group) -> Tensor:
    """All-to-all of rows: rows [sum(send[:i]), sum(send[:i+1])) go to rank i of `group`."""
    return AllToAll.apply(tensor, send_counts, recv_counts, group)
