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
So the sharded tables are not parameters of the layer at all: `shard_lookup_layer` moves
them into the `ShardedRowAttention` object (a plain object, not a module), the layer's
`key_table`/`value_table` become None, and no ZeRO stage, hook or checkpoint of the
wrapped module ever sees them. Their optimizer, clipping and checkpoints live in
`l3train.parallel.sharded_optim`. The tables keep the dtype they were built in (fp32 in
training: master weights) and are cast to the activations' dtype for the lookup, so bf16
training keeps fp32 rows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from l3train.model.l3_attention import row_attention_with_entropy
from l3train.model.l3_layer import LargeLookupLayer, bounds_from_rows
from l3train.parallel.collectives import ReplicatedInput, ScaleGradient, SumOverGroup, exchange
from l3train.parallel.shard_plan import ShardPlan


class ShardedRowAttention:
    """Drop-in for `row_attention_with_entropy` when this rank holds one shard of the rows.

    Owns this rank's tables (`keys`, and `values` when untied; leaf tensors, not module
    parameters) laid out by `local_bounds`."""

    def __init__(self, owner: np.ndarray, local_rows_per_token: np.ndarray, keys: nn.Parameter,
                 values: nn.Parameter | None, tp_rank: int, tp_size: int, tp_group, dp_size: int, dp_group,
                 device: torch.device, gradient_scale: float | None = None) -> None:
        self.owner = torch.as_tensor(owner, dtype=torch.long, device=device)
        self.local_bounds = bounds_from_rows(local_rows_per_token).to(device)
        self.keys, self.values = keys, values
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        self.dp_size, self.dp_group = dp_size, dp_group
        # The rows' share of the replica average: 1/DP (see the module docstring).
        self.gradient_scale = 1.0 / dp_size if gradient_scale is None else gradient_scale

    def tables(self) -> list[nn.Parameter]:
        """This rank's row tensors (the key table, plus the value table when untied)."""
        return [self.keys] if self.values is None else [self.keys, self.values]

    def __call__(self, x: Tensor, token_ids: Tensor, bounds: Tensor, keys: Tensor | None = None,
                 values: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Same contract as `row_attention_with_entropy`, except that `bounds`, `keys` and
        `values` (the layer's, None once sharded) are ignored: the lookup uses this rank's
        own tables, laid out by `local_bounds`."""
        keys = self.keys.to(x.dtype)
        values = keys if self.values is None else self.values.to(x.dtype)
        if self.tp_size > 1:
            x = ReplicatedInput.apply(x, self.tp_group)
        if self.gradient_scale != 1.0:
            tied = self.values is None
            keys = ScaleGradient.apply(keys, self.gradient_scale)
            values = keys if tied else ScaleGradient.apply(values, self.gradient_scale)
        shard = self.owner[token_ids]
        mine = torch.nonzero(shard % self.tp_size == self.tp_rank).flatten()
        destination = shard[mine] // self.tp_size
        order = torch.argsort(destination, stable=True)
        positions = mine[order]
        send_counts = torch.bincount(destination, minlength=self.dp_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.dp_group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        remote_ids = exchange(token_ids[positions], send, recv, self.dp_group)
        remote_x = exchange(x[positions], send, recv, self.dp_group)
        remote_out, remote_entropy = row_attention_with_entropy(remote_x, remote_ids, self.local_bounds, keys, values)
        local_out = exchange(remote_out, recv, send, self.dp_group)
        local_entropy = exchange(remote_entropy, recv, send, self.dp_group)
        out = x.new_zeros(x.shape[0], values.shape[1]).index_copy(0, positions, local_out)
        entropy = local_entropy.new_zeros(x.shape[0]).index_copy(0, positions, local_entropy)
        if self.tp_size > 1:
            out = SumOverGroup.apply(out, self.tp_group)
            dist.all_reduce(entropy, group=self.tp_group)
        return out, entropy


def shard_lookup_layer(layer: LargeLookupLayer, plan: ShardPlan, tp_rank: int, tp_size: int, tp_group,
                       dp_rank: int, dp_size: int, dp_group, device: torch.device | None = None,
                       gradient_scale: float | None = None) -> ShardedRowAttention:
    """Keep only this rank's rows of `layer` (copied from its full initialisation, so a sharded
    run starts from the single-process weights) and route its lookups to the owners.

    This rank holds shard `dp_rank * tp_size + tp_rank`. The rows move out of the module
    into the returned `ShardedRowAttention` (on `device`, default: where the table was),
    which becomes `layer.row_attention`. Under sequence parallelism every rank holds its own
    positions: pass tp_size=1 and the whole TP×DP world as the "DP" group (shard s is then
    global rank s), with `gradient_scale` 1/DP. The layer's `bounds` buffer keeps the global
    allocation: it is what a checkpoint needs.
    """
    if plan.num_shards != tp_size * dp_size:
        raise ValueError(f"shard plan has {plan.num_shards} shards, expected TP×DP = {tp_size * dp_size}")
    shard = dp_rank * tp_size + tp_rank
    device = device or layer.key_table.device
    rows = torch.as_tensor(plan.global_row_indices(shard), dtype=torch.long, device=layer.key_table.device)

    def local(table: Tensor) -> nn.Parameter:
        return nn.Parameter(table.detach()[rows].to(device=device, copy=True))

    keys = local(layer.key_table)
    values = None if layer.tied_kv else local(layer.value_table)
    layer.key_table = None
    layer.value_table = None
    layer.row_attention = ShardedRowAttention(plan.owner, plan.local_rows_per_token(shard), keys, values, tp_rank,
                                              tp_size, tp_group, dp_size, dp_group, device, gradient_scale)
    return layer.row_attention
