"""L³ rows partitioned by the static router over the tensor- and data-parallel groups.

Every token's rows live on exactly one rank (a shard of the `ShardPlan`); shard s is held
by the rank with data-parallel index s // TP and tensor-parallel index s % TP. Because
routing depends on token ids only, each rank knows before the layer runs where each of
its positions must go. Per L³ layer and step:

1. TP split of the work: the TP ranks of one replica hold the same positions; TP rank j
   handles only the positions whose token's shard has TP index j.
2. DP routing: those positions (hidden state x and token id) travel to the DP rank that
   owns their rows with one all-to-all over the DP group of TP index j (counts known
   from the ids), are computed there with the ordinary `row_attention_with_entropy` on
   the local table, and travel back with a second all-to-all.
3. TP combine: each TP rank now holds the lookups of its positions and zeros elsewhere;
   one all-reduce (sum) over the TP group gives every TP rank all N lookups. Its backward
   is the identity, and the matching backward all-reduce on x sums the per-rank
   contributions to dL/dx.

Bytes per layer and step, for N positions per replica, fp32, d_in/d_emb widths:
TP all-reduce of N·d_emb floats (ring: ~2·N·d_emb·4 bytes per rank), and per rank an
all-to-all of ≈(N/TP)·(d_in·4 + 8) bytes out and (N/TP)·d_emb·4 bytes back (a fraction
(DP-1)/DP of it leaves the rank), doubled in backward. Replicating the rows instead would
cost every rank v·(d_in [+ d_emb]) parameters plus their gradient and 2 Adam moments
(16 bytes per fp32 element), and a DP all-reduce of the whole table's gradient every
step. Example, the paper's layer (v = 710K rows, tied, d = 2048) with N = 8K positions
per replica: replicated, 1.45G elements = 23 GB per rank per layer; sharded over 8
ranks, 2.9 GB per rank, for ~64 MB (TP all-reduce) or ~2·64 MB (DP all-to-all) of
activations moved per layer per step instead of a 5.8 GB gradient all-reduce.

Gradients: a shard's rows receive the gradient of every DP rank's loss (the positions
came from all of them), i.e. Σ_r ∇L_r, whereas replicated parameters get DP's average
(1/DP)·Σ_r ∇L_r. The tables are therefore scaled by 1/DP in backward, and they must not
be all-reduced or partitioned over DP by ZeRO (their shapes even differ between ranks).
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

from l3train.model.l3_attention import row_attention_with_entropy
from l3train.model.l3_layer import LargeLookupLayer, LocalRowTable, bounds_from_rows
from l3train.parallel.collectives import ReplicatedInput, ScaleGradient, SumOverGroup, exchange
from l3train.parallel.shard_plan import ShardPlan
from l3train.parallel.state import ParallelState


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
        # The rows' share of the replica average: 1/DP (see the module docstring).
        self.gradient_scale = gradient_scale

    def tables(self) -> list[nn.Parameter]:
        """This rank's row tensors (the key table, plus the value table when untied)."""
        return self.local.tensors()

    def forward(self, x: Tensor, token_ids: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor]:
        """Same contract as `LocalRowTable`; the layer's global `bounds` are not needed: the
        lookup runs on this rank's own tables, laid out by `local_bounds`."""
        route = self.routing
        keys = ScaleGradient.apply(self.local.keys, self.gradient_scale)
        values = keys if self.local.values is None else ScaleGradient.apply(self.local.values, self.gradient_scale)
        if route.tp_size > 1:
            x = ReplicatedInput.apply(x, route.tp_group)
        shard = self.owner[token_ids]
        mine = torch.nonzero(shard % route.tp_size == route.tp_rank).flatten()
        destination = shard[mine] // route.tp_size
        order = torch.argsort(destination, stable=True)
        positions = mine[order]
        send_counts = torch.bincount(destination, minlength=route.dp_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=route.dp_group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        remote_ids = exchange(token_ids[positions], send, recv, route.dp_group)
        remote_x = exchange(x[positions], send, recv, route.dp_group)
        # In the tables' dtype (see the module docstring: fp32 row gradients under bf16).
        remote_out, remote_entropy = row_attention_with_entropy(remote_x.to(keys.dtype), remote_ids,
                                                                self.local_bounds, keys, values)
        local_out = exchange(remote_out.to(x.dtype), recv, send, route.dp_group)
        local_entropy = exchange(remote_entropy, recv, send, route.dp_group)
        out = x.new_zeros(x.shape[0], values.shape[1]).index_copy(0, positions, local_out)
        entropy = local_entropy.new_zeros(x.shape[0]).index_copy(0, positions, local_entropy)
        if route.tp_size > 1:
            out = SumOverGroup.apply(out, route.tp_group)
            dist.all_reduce(entropy, group=route.tp_group)
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
