"""Expert parallelism: the experts of every MoE layer partitioned over the EP group by all-to-all.

The EP group is `moe.expert_parallel` consecutive data-parallel ranks (megatron-core's
expert groups); EP rank r holds experts [r·E/EP, (r+1)·E/EP). Per MoE layer and micro-batch
each rank routes its own positions (router and capacity drop as in one process, on its
own micro-batch), then:

1. one all-to-all of the per-expert assignment counts, so every rank knows how many rows
   it will receive from each source for each of its experts;
2. one all-to-all of the assigned hidden states (rows already sorted by expert, so the rows
   for EP rank r are contiguous), regrouped by local expert, through the experts;
3. one all-to-all sending the outputs back; the router gates combine them at the source.
Backward reverses both all-to-alls.

Gradients: an expert's weights receive Σ over the EP group of its ranks' loss gradients,
whereas a replicated weight gets the DP average (1/DP)·Σ over all ranks. The weights are
therefore scaled by 1/DP in backward and, at each accumulation boundary, all-reduced (sum)
over the expert-data-parallel group (the DP/EP ranks that hold the same experts); then
every copy holds exactly the single-process gradient. Like the sharded L³ rows they differ
between ranks, so they are not parameters of the module DeepSpeed wraps: `shard_experts`
swaps the MoE layer's expert backend for an `ExpertParallelExperts`, which keeps this
rank's slice in a plain holder; their optimizer, clipping and checkpoints are in
l3train.parallel.sharded_optim (`ShardedExperts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from l3train.model.moe import Experts, MoEFeedForward, run_experts
from l3train.parallel import collectives
from l3train.parallel.collectives import ScaleGradient, exchange
from l3train.parallel.state import ParallelState


@dataclass
class RankLocalExperts:
    """This rank's slice of the stacked expert weights (leaf tensors, not module parameters)."""

    w1: nn.Parameter
    w3: nn.Parameter
    w2: nn.Parameter

    def tensors(self) -> list[nn.Parameter]:
        return [self.w1, self.w3, self.w2]


class ExpertParallelExperts(nn.Module):
    """Expert backend of an MoE layer holding this rank's experts; dispatches rows by all-to-all."""

    def __init__(self, local: RankLocalExperts, num_experts: int, parallel: ParallelState) -> None:
        super().__init__()
        self.local, self.num_experts, self.parallel = local, num_experts, parallel

    def tables(self) -> list[nn.Parameter]:
        return self.local.tensors()

    def forward(self, x: Tensor, counts: list[int]) -> Tensor:
        """Same contract as the local `Experts`."""
        ep_size, group = self.parallel.ep_size, self.parallel.ep_group
        local = self.num_experts // ep_size
        send_by_expert = torch.tensor(counts, dtype=torch.long, device=x.device)
        recv_by_expert = torch.empty_like(send_by_expert)  # (source, local expert), flattened
        collectives.all_to_all_single(recv_by_expert, send_by_expert, group=group)
        send = send_by_expert.view(ep_size, local).sum(1).tolist()
        received_counts = recv_by_expert.view(ep_size, local)
        recv = received_counts.sum(1).tolist()
        received = exchange(x, send, recv, group)  # grouped by source, then by local expert
        # Regroup by local expert (then by source) so each expert's rows are contiguous.
        starts = (torch.cumsum(recv_by_expert, 0) - recv_by_expert).view(ep_size, local)
        lengths = received_counts.t().flatten()
        offsets = torch.cumsum(lengths, 0) - lengths
        by_expert = (torch.repeat_interleave(starts.t().flatten() - offsets, lengths)
                     + torch.arange(received.shape[0], device=x.device))
        scale = 1.0 / self.parallel.dp_size
        w1, w3, w2 = (ScaleGradient.apply(w.to(x.dtype), scale) for w in self.tables())
        out = run_experts(received[by_expert], received_counts.sum(0).tolist(), w1, w3, w2)
        out = out[torch.argsort(by_expert)]  # back to the received order
        return exchange(out, recv, send, group)

    def reduce_gradients(self) -> None:
        """Sum the gradients over the ranks holding the same experts (no-op when there is one)."""
        if self.parallel.dp_size // self.parallel.ep_size > 1:
            for weight in self.tables():
                if weight.grad is not None:
                    dist.all_reduce(weight.grad, group=self.parallel.expert_dp_group)


def shard_experts(layer: MoEFeedForward, parallel: ParallelState,
                  device: torch.device | None = None) -> ExpertParallelExperts:
    """Swap `layer`'s expert backend for one holding only this rank's experts (copied from the
    full initialisation, so an EP run starts from the single-process weights); returns it."""
    experts = layer.experts
    if not isinstance(experts, Experts):
        raise ValueError(f"the layer's experts are already split ({type(experts).__name__})")
    if layer.num_experts % parallel.ep_size:
        raise ValueError(f"{layer.num_experts} experts cannot be split over {parallel.ep_size} ranks")
    local = layer.num_experts // parallel.ep_size
    device = device or experts.w1.device

    def mine(weight: Tensor) -> nn.Parameter:
        rows = weight.detach()[parallel.ep_rank * local:(parallel.ep_rank + 1) * local]
        return nn.Parameter(rows.to(device=device, copy=True))

    layer.experts = ExpertParallelExperts(RankLocalExperts(mine(experts.w1), mine(experts.w3), mine(experts.w2)),
                                          layer.num_experts, parallel)
    return layer.experts
