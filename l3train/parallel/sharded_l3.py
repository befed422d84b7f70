"""L³ rows partitioned by the static router over the tensor- and data-parallel groups.

Every token's rows live on exactly one rank (a shard of the `ShardPlan`); shard s is held
by the rank with data-parallel index s // TP and tensor-parallel index s % TP. Because
routing depends on token ids only, each rank knows before the layer runs where each of
its positions must go. Per L³ layer and step:

1. TP split of the work: the TP ranks of one replica hold the same positions; TP rank j
   handles only the positions whose token's shard has TP index j.
2. DP routing: those positions' hidden states travel to the DP rank that owns their rows
   with one all-to-all over the DP group of TP index j, are computed there with the
   ordinary `attend` on the local table, and travel back with a second all-to-all.
3. TP combine: each TP rank now holds the lookups of its positions and zeros elsewhere;
   one all-reduce (sum) over the TP group gives every TP rank all N lookups. Its backward
   is the identity, and the matching backward all-reduce on x sums the per-rank
   contributions to dL/dx.

What depends on the token ids alone is the `ShardedRoute`, built once per micro-batch for
all layers (`LookupRoutes`): which positions go to which rank, the all-to-all sizes
(exchanged and read on the host once: the only host synchronisation of the sharded
path), the token ids the other ranks send (exchanged once) and the plan of the lookups
this rank serves. A layer's forward then only moves x and the results.

Bytes per layer and step, for N positions per replica, fp32, d_in/d_emb widths:
TP all-reduce of N·d_emb floats (ring: ~2·N·d_emb·4 bytes per rank), and per rank an
all-to-all of ≈(N/TP)·d_in·4 bytes out and (N/TP)·(d_emb + 1)·4 bytes back (outputs and
entropies packed; a fraction (DP-1)/DP of it leaves the rank), doubled in backward; plus,
once per micro-batch for all layers, the split sizes and (N/TP)·8 bytes of token ids. Replicating the rows instead would
cost every rank v·(d_in [+ d_emb]) parameters plus their gradient and 2 Adam moments
(16 bytes per fp32 element), and a DP all-reduce of the whole table's gradient every
step. Example, the paper's layer (v = 710K rows, tied, d = 2048) with N = 8K positions
per replica: replicated, 1.45G elements = 23 GB per rank per layer; sharded over 8
ranks, 2.9 GB per rank, for ~64 MB (TP all-reduce) or ~2·64 MB (DP all-to-all) of
activations moved per layer per step instead of a 5.8 GB gradient all-reduce.

Gradients: a shard's rows receive the gradient of every DP rank's loss (the positions
came from all of them), i.e. Σ_r ∇L_r, whereas replicated parameters get DP's average
(1/DP)·Σ_r ∇L_r. The tables' gradients are therefore scaled by 1/DP (`gradient_scale`),
in place at the accumulation boundary together with the clipping coefficient
(`ShardedRows.scale_gradients`): one pass over them per step, where scaling in backward
cost a table-sized copy per micro-batch. They must not be all-reduced or partitioned over
DP by ZeRO (their shapes even differ between ranks).
On CPUs the kernel gives the tables row-sparse gradients (only the rows of the tokens this
rank served: l3train.model.l3_cpu.row_sparse_gradient), coalesced as micro-batches add up,
and their AdamW steps that form (l3train.row_adamw): no table-shaped gradient exists.
So the sharded tables are not parameters of the layer at all: `shard_lookup_layer` swaps
the layer's row backend for a `ShardedRowTable`, which keeps this rank's tables in a plain
`RankLocalTables` holder (not a module), so no ZeRO stage, hook or checkpoint of the
wrapped module ever sees them. Their optimizer, clipping and checkpoints live in
`l3train.parallel.sharded_optim`. The tables keep the dtype they were built in (fp32 in
training: master weights), and the owner computes its lookups in that dtype: under bf16
the positions travel in bf16 and are widened on arrival, the outputs are narrowed before
they travel back. The rows' gradient is thus produced, scaled and (tied tables) summed in
fp32, and autograd accumulates it over micro-batches in fp32; a bf16 copy of the tables
would round every micro-batch's gradient to bf16 first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from l3train.model.l3_attention import RowPlan, attend, plan_lookup
from l3train.model.l3_cpu import coalesce_row_sparse_gradient
from l3train.model.l3_layer import LargeLookupLayer, LocalRowTable, bounds_from_rows
from l3train.parallel import collectives
from l3train.parallel.collectives import ReplicatedInput, SumOverGroup, exchange
from l3train.parallel.shard_plan import ShardPlan
from l3train.parallel.shared_memory import shared_memory_exchange
from l3train.parallel.state import ParallelState
from l3train.row_adamw import row_sparse_adamw_available


@dataclass(frozen=True)
class RowRouting:
    """The groups a sharded layer routes over. Normally the TP group of the replica (TP split
    of the work) and the DP group of this TP index (all-to-all); under sequence parallelism
    every rank holds its own positions, so there is no TP split and the all-to-all spans the
    whole TP×DP world (shard s is then global rank s)."""

    tp_rank: int
    tp_size: int
    tp_group: dist.ProcessGroup | None
    dp_rank: int
    dp_size: int
    dp_group: dist.ProcessGroup

    @classmethod
    def of(cls, parallel: ParallelState, sequence_parallel: bool = False) -> RowRouting:
        if sequence_parallel:
            return cls(0, 1, None, dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
        return cls(parallel.tp_rank, parallel.tp_size, parallel.tp_group, parallel.dp_rank, parallel.dp_size,
                   parallel.dp_group)

    @property
    def shard(self) -> int:
        return self.dp_rank * self.tp_size + self.tp_rank


@dataclass
class ShardedRoute:
    """A micro-batch's routing on one rank (depends on the token ids only)."""

    positions: Tensor  # this rank's share of the positions, grouped by destination DP rank
    send_counts: list[int]  # positions sent to each DP rank
    recv_counts: list[int]  # positions received from each DP rank
    plan: RowPlan  # of the lookups this rank serves, on its local tables


@dataclass
class RankLocalTables:
    """This rank's rows (leaf tensors, not module parameters: see the module docstring)."""

    keys: nn.Parameter
    values: nn.Parameter | None  # None when keys and values are tied

    def tensors(self) -> list[nn.Parameter]:
        return [self.keys] if self.values is None else [self.keys, self.values]


class ShardedRowTable(nn.Module):
    """Row backend of an L³ layer when this rank holds one shard of the rows (`ShardPlan`)."""

    def __init__(self, plan: ShardPlan, local: RankLocalTables, routing: RowRouting, gradient_scale: float,
                 device: torch.device) -> None:
        super().__init__()
        if plan.num_shards != routing.tp_size * routing.dp_size:
            raise ValueError(f"shard plan has {plan.num_shards} shards, expected TP×DP = "
                             f"{routing.tp_size * routing.dp_size}")
        self.register_buffer("owner", torch.as_tensor(plan.owner, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("local_bounds", bounds_from_rows(plan.local_rows_per_token(routing.shard)).to(device),
                             persistent=False)
        self.local, self.routing = local, routing
        for table in local.tensors():  # row-sparse gradients (the CPU kernel's) summed as they arrive
            table.register_post_accumulate_grad_hook(coalesce_row_sparse_gradient)
        # d_in + d_emb: sizes the torch path's chunks.
        self.feature_width = local.keys.shape[1] + (local.keys if local.values is None else local.values).shape[1]
        # Layers of one shard plan and placement share a route.
        self.routing_key = ("rows sharded", plan.ownership_hash, routing.shard, routing.tp_size, self.feature_width)
        # The rows' share of the replica average: 1/DP, applied by their optimizer (see the module docstring).
        self.gradient_scale = gradient_scale

    @property
    def transport(self) -> str:
        """What the exchanges go through: shared memory (ranks of one host) or the DP group's backend."""
        group = self.routing.dp_group
        return "shared memory" if shared_memory_exchange(group) else dist.get_backend(group)

    def tables(self) -> list[nn.Parameter]:
        """This rank's row tensors (the key table, plus the value table when untied)."""
        return self.local.tensors()

    def route(self, token_ids: Tensor, bounds: Tensor) -> ShardedRoute:
        """Where this micro-batch's positions go (the layer's global `bounds` are not needed:
        the owners and the local tables' layout come from the shard plan)."""
        route = self.routing
        shard = self.owner[token_ids]
        # Destination DP rank of this TP rank's positions; the others get key dp_size and sort last.
        key = torch.where(shard % route.tp_size == route.tp_rank, shard // route.tp_size, route.dp_size)
        order = torch.argsort(key, stable=True)
        # Counted with index_add_ (bincount would read the largest key on the host first).
        send_counts = torch.zeros(route.dp_size + 1, dtype=torch.long, device=key.device).index_add_(
            0, key, torch.ones_like(key))[:-1]
        recv_counts = torch.empty_like(send_counts)
        collectives.all_to_all_single(recv_counts, send_counts, group=route.dp_group)
        counts = torch.cat([send_counts, recv_counts]).tolist()  # the one host read
        send, recv = counts[:route.dp_size], counts[route.dp_size:]
        positions = order[:sum(send)]
        remote_ids = exchange(token_ids[positions], send, recv, route.dp_group)
        # Row-sparse gradients on the CPU kernel: this rank's optimizer steps them (sharded_optim).
        return ShardedRoute(positions, send, recv, plan_lookup(remote_ids, self.local_bounds, self.feature_width,
                                                                    table_dtype=self.local.keys.dtype,
                                                                    row_sparse_gradients=row_sparse_adamw_available()))

    def forward(self, x: Tensor, route: ShardedRoute) -> tuple[Tensor, Tensor]:
        """Same contract as `LocalRowTable`, on this rank's own tables (`local_bounds`)."""
        group = self.routing
        keys = self.local.keys
        values = keys if self.local.values is None else self.local.values
        if group.tp_size > 1:
            x = ReplicatedInput.apply(x, group.tp_group)
        remote_x = exchange(x[route.positions], route.send_counts, route.recv_counts, group.dp_group)
        # In the tables' dtype (see the module docstring: fp32 row gradients under bf16).
        remote_out, remote_entropy = attend(remote_x.to(keys.dtype), keys, values, route.plan)
        # Outputs and entropies travel back in one all-to-all (the entropy, for monitoring only,
        # in x's dtype: rounded to bf16 under bf16).
        packed = torch.cat([remote_out.to(x.dtype), remote_entropy.to(x.dtype)[:, None]], dim=1)
        local = exchange(packed, route.recv_counts, route.send_counts, group.dp_group)
        local_out, local_entropy = local[:, :-1], local[:, -1].to(remote_entropy.dtype)
        out = x.new_zeros(x.shape[0], values.shape[1]).index_copy(0, route.positions, local_out)
        entropy = local_entropy.new_zeros(x.shape[0]).index_copy(0, route.positions, local_entropy)
        if group.tp_size > 1:
            out = SumOverGroup.apply(out, group.tp_group)
            dist.all_reduce(entropy, group=group.tp_group)
        return out, entropy


def shard_lookup_layer(layer: LargeLookupLayer, plan: ShardPlan, parallel: ParallelState,
                       sequence_parallel: bool = False, device: torch.device | None = None) -> ShardedRowTable:
    """Swap `layer`'s row backend for a `ShardedRowTable` holding this rank's shard of the rows,
    with the single-process values: built directly by the layer's `table_init` when its
    tables were deferred (on the meta device: no rank ever holds the whole table), else
    copied from the tables. Returns the new backend.

    This rank holds shard `dp_rank * tp_size + tp_rank` (under sequence parallelism: its
    global rank). The rows go to `device` (default: where the table was, or the host). The
    layer's `bounds` buffer keeps the global allocation: it is what a checkpoint needs."""
    full = layer.rows
    if not isinstance(full, LocalRowTable):
        raise ValueError(f"the layer's rows are already sharded ({type(full).__name__})")
    routing = RowRouting.of(parallel, sequence_parallel)
    deferred = full.key_table.is_meta
    device = device or (torch.device("cpu") if deferred else full.key_table.device)
    rows = torch.as_tensor(plan.global_row_indices(routing.shard), dtype=torch.long)

    def local(index: int, table: Tensor) -> nn.Parameter:
        values = layer.table_init(index, rows) if deferred else table.detach()[rows.to(table.device)]
        return nn.Parameter(values.to(device=device))  # a fresh tensor already: no second copy

    tables = RankLocalTables(local(0, full.key_table),
                             None if full.value_table is None else local(1, full.value_table))
    layer.rows = ShardedRowTable(plan, tables, routing, 1.0 / parallel.dp_size, device)
    return layer.rows
