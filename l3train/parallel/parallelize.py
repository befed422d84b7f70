"""The one step that turns a plain model into this rank's part of a parallel model.

The model code holds no parallelism (torchtitan's split): `parallelize` applies, from
outside and in this order,
1. tensor (and sequence) parallelism of the backbone: megatron-core layers swapped in;
2. sharded L³ rows: every L³ layer's row backend becomes a `ShardedRowTable`;
3. expert parallelism: every MoE layer's expert backend becomes an `ExpertParallelExperts`;
   for both, on CPUs, the all-to-alls between ranks of one host go through shared memory;
4. activation recomputation of the blocks `training.recompute` selects;
and returns the tensors that now live on this rank only, grouped with their optimizers
(`ShardedRows`, `ShardedExperts`), for the trainer to step, clip and checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from l3train.allocation.allocation import Allocation
from l3train.config import Config, WorldLayout
from l3train.model.llama import DecoderLM
from l3train.parallel.expert_parallel import shard_experts
from l3train.parallel.recompute import apply_recompute
from l3train.parallel.shard_plan import plan_shards
from l3train.parallel.sharded_l3 import shard_lookup_layer
from l3train.parallel.sharded_optim import RankLocalParameters, ShardedExperts, ShardedRows
from l3train.parallel.shared_memory import enable_shared_memory
from l3train.parallel.state import ParallelState
from l3train.parallel.tensor_parallel import parallelize_tensor


@dataclass
class ParallelModel:
    model: DecoderLM  # the module DeepSpeed wraps
    rows: ShardedRows | None  # this rank's L³ rows, when sharded
    experts: ShardedExperts | None  # this rank's experts, under expert parallelism

    @property
    def rank_local(self) -> list[RankLocalParameters]:
        return [part for part in (self.rows, self.experts) if part is not None]


def _exchange_through_shared_memory(group, cfg: Config, device: torch.device) -> None:
    """On CPUs, `group`'s all-to-alls skip gloo's TCP between ranks of one host
    (`parallel.shared_memory_exchange`; l3train.parallel.shared_memory decides where it can)."""
    if device.type == "cpu" and cfg.parallel.shared_memory_exchange:
        enable_shared_memory(group)


def parallelize(model: DecoderLM, allocation: Allocation | None, cfg: Config, layout: WorldLayout,
                parallel: ParallelState, device: torch.device) -> ParallelModel:
    """Apply `layout` to `model` (built identically on every rank) before DeepSpeed wraps it."""
    if parallel.tp_size > 1:
        model = parallelize_tensor(model, parallel, cfg.parallel.sequence_parallel)
    rows = experts = None
    if layout.rows_sharded:
        plan = plan_shards(allocation.rows_per_token, allocation.token_frequencies, parallel.tp_size * parallel.dp_size)
        backends = [shard_lookup_layer(layer, plan, parallel, cfg.parallel.sequence_parallel, device)
                    for layer in model.l3_layers()]
        _exchange_through_shared_memory(backends[0].routing.dp_group, cfg, device)
        rows = ShardedRows(backends, plan, cfg)
    if layout.experts_split:
        experts = ShardedExperts([shard_experts(layer, parallel, device) for layer in model.moe_layers().values()],
                                 parallel, cfg)
        _exchange_through_shared_memory(parallel.ep_group, cfg, device)
    apply_recompute(model, cfg.training.recompute)
    return ParallelModel(model, rows, experts)
