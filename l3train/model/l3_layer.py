"""The Large Lookup Layer:  out = W_mix [ Norm(W_up(V_tᵀ softmax(K_t x))) ; x ].

Each token id t owns the contiguous rows `bounds[t]:bounds[t+1]` of the key table K and
the value table V (one table when `tied_kv`: K = V, which needs d_emb = d_in). The
allocation of rows to tokens (the LZW allocation) is a persistent buffer: it is saved
and loaded with the weights, because a table without its allocation is meaningless.

Where the rows live is the layer's *row backend* (`self.rows`): `LocalRowTable` holds
the whole tables as parameters; l3train.parallel swaps in a backend that holds one
shard and routes positions to the ranks owning their rows. Every backend computes
V_tᵀ softmax(K_t x) with the same function, so the formula below never changes.
See docs/l3_layer.md.

Routing is static: which rows (and which rank) each position needs follows from its
token id alone. A backend splits its work accordingly into `route(token_ids, bounds)`,
everything that depends on the ids (sorting, kernel work lists, all-to-all sizes; these
read sizes on the host, which on a GPU waits for the device), and the lookup itself,
which takes that route and never waits. `LookupRoutes` carries one micro-batch's ids and
builds each route once, for every L³ layer of the model and for backward.

The tables are initialised by `init_rows`, which gives any subset of rows exactly the
values the whole table would hold, so a rank can build only its own rows: layers built
under `deferred_row_tables()` leave their tables on the meta device (no memory), and the
parallel step creates each rank's rows directly (l3train.parallel.sharded_l3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from l3train.allocation.allocation import allocation_hash
from l3train.model.l3_attention import RowPlan, attend, plan_lookup
from l3train.model.l3_cpu import coalesce_row_sparse_gradient
from l3train.model.norms import make_norm
from l3train.model.roles import ParamRole


def bounds_from_rows(rows_per_token: Tensor | np.ndarray) -> Tensor:
    """Row offsets (vocab+1,) from rows per token (vocab,): token t owns bounds[t]:bounds[t+1]."""
    rows = torch.as_tensor(np.asarray(rows_per_token), dtype=torch.long)
    return torch.cat([rows.new_zeros(1), torch.cumsum(rows, 0)])


# Rows per block of the table initialisation: each block is drawn from its own generator,
# so a subset of rows costs one block of working memory at a time (4096 × 2048 fp32 = 32 MB).
INIT_BLOCK_ROWS = 4096


def init_rows(num_rows: int, width: int, std: float, seed: int, rows: Tensor | None = None) -> Tensor:
    """Normal(0, std) rows `rows` (all when None) of a `num_rows` × `width` table, identical to
    the same rows of the whole table: block b of `INIT_BLOCK_ROWS` rows comes from a generator
    seeded by (seed, b), whichever rows a caller asks for (one block in memory at a time)."""
    wanted = torch.arange(num_rows) if rows is None else rows.cpu()
    out = torch.empty(len(wanted), width)
    block_of = wanted // INIT_BLOCK_ROWS
    for block in torch.unique(block_of).tolist():
        start = block * INIT_BLOCK_ROWS
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        values = torch.randn(min(INIT_BLOCK_ROWS, num_rows - start), width, generator=generator).mul_(std)
        chosen = torch.nonzero(block_of == block).flatten()
        out[chosen] = values[wanted[chosen] - start]
    return out


_deferred = False


@contextlib.contextmanager
def deferred_row_tables() -> Iterator[None]:
    """L³ layers built inside have their row tables on the meta device: not allocated, not
    initialised; whoever places the rows creates them with `init_rows`."""
    global _deferred
    _deferred, previous = True, _deferred
    try:
        yield
    finally:
        _deferred = previous


class RowBackend(Protocol):
    """Where a layer's rows live. `route` prepares a micro-batch's lookups from its token ids
    (N,) alone; calling the backend with x (N, d_in) and that route gives (a (N, d_emb),
    entropy (N,)). Layers whose backends have equal `routing_key`s share one route."""

    routing_key: Hashable

    def route(self, token_ids: Tensor, bounds: Tensor) -> Any: ...

    def __call__(self, x: Tensor, route: Any) -> tuple[Tensor, Tensor]: ...


class LocalRowTable(nn.Module):
    """All rows of every token in this process: K, and V when untied, as parameters."""

    parameter_role = ParamRole.L3_ROWS

    def __init__(self, num_rows: int, d_in: int, d_emb: int, tied_kv: bool) -> None:
        super().__init__()
        device = "meta" if _deferred else None
        self.key_table = nn.Parameter(torch.empty(num_rows, d_in, device=device))
        self.value_table = None if tied_kv else nn.Parameter(torch.empty(num_rows, d_emb, device=device))
        self.routing_key = ("all rows", d_in + d_emb)  # the torch path's chunks depend on the widths
        self.row_sparse_gradients = False  # see `give_row_sparse_gradients`

    def tables(self) -> tuple[Tensor, Tensor]:
        """(K, V); the same tensor twice when tied."""
        return self.key_table, self.key_table if self.value_table is None else self.value_table

    def give_row_sparse_gradients(self) -> None:
        """From now on the CPU kernel gives the tables row-sparse gradients (only the rows of a
        micro-batch's tokens, coalesced as micro-batches add up), for an optimizer that steps
        them as they are (l3train.optim.SkippableAdamW); the torch and Triton paths still give
        table-shaped ones. Set by the trainer where nothing between backward and the optimizer
        needs a table-shaped gradient."""
        if not self.row_sparse_gradients:
            self.row_sparse_gradients = True
            for table in [self.key_table] + ([] if self.value_table is None else [self.value_table]):
                table.register_post_accumulate_grad_hook(coalesce_row_sparse_gradient)

    def route(self, token_ids: Tensor, bounds: Tensor) -> RowPlan:
        return plan_lookup(token_ids, bounds, self.routing_key[1], table_dtype=self.key_table.dtype,
                           row_sparse_gradients=self.row_sparse_gradients)

    def forward(self, x: Tensor, route: RowPlan) -> tuple[Tensor, Tensor]:
        keys, values = self.tables()
        return attend(x, keys, values, route)


class LookupRoutes:
    """One micro-batch's token ids, and the routes the L³ layers' backends build from them.

    The model makes one per forward pass and passes it to every L³ layer. The first layer
    of each routing key (same allocation, same kind of backend) builds the route; the
    other layers reuse it, and so do the backward passes (autograd keeps the plans) and
    recomputed forwards. `part` derives the routes of a slice of the ids, made once too
    (a rank's part of the sequence under sequence parallelism).
    """

    def __init__(self, token_ids: Tensor) -> None:
        self.token_ids = token_ids
        self._routes: dict[Hashable, Any] = {}
        self._parts: dict[Hashable, LookupRoutes] = {}

    @staticmethod
    def of(ids: Tensor | LookupRoutes) -> LookupRoutes:
        """`ids` if they are routes already, else fresh routes of these token ids."""
        return ids if isinstance(ids, LookupRoutes) else LookupRoutes(ids)

    def route_for(self, layer: LargeLookupLayer) -> Any:
        key = (layer.allocation_fingerprint, layer.rows.routing_key)
        if key not in self._routes:
            self._routes[key] = layer.rows.route(self.token_ids.reshape(-1), layer.bounds)
        return self._routes[key]

    def part(self, key: Hashable, select: Callable[[Tensor], Tensor]) -> LookupRoutes:
        """Routes of `select(token_ids)`, one object per `key` for the micro-batch."""
        if key not in self._parts:
            self._parts[key] = LookupRoutes(select(self.token_ids))
        return self._parts[key]


class LargeLookupLayer(nn.Module):
    """One L³ layer for hidden size `d_in`, producing `d_out` features per position."""

    def __init__(self, rows_per_token: Tensor | np.ndarray, d_in: int, d_emb: int, d_up: int,
                 d_out: int | None = None, tied_kv: bool = True, norm: str = "rms",
                 norm_eps: float = 1e-5, init_std: float = 0.02) -> None:
        super().__init__()
        if tied_kv and d_emb != d_in:
            raise ValueError(f"tied keys/values need d_emb == d_in, got d_emb={d_emb}, d_in={d_in}")
        self.register_buffer("bounds", bounds_from_rows(rows_per_token), persistent=True)
        num_rows = int(np.asarray(rows_per_token).sum())  # not from `bounds`: it may be on the meta device
        # Layers with the same allocation share routes (`LookupRoutes`); a checkpoint's allocation
        # is checked against the config's by hash before it is loaded into `bounds`.
        self.allocation_fingerprint = allocation_hash(np.asarray(rows_per_token))
        self.tied_kv = tied_kv
        self.rows_width = (d_in, d_emb)  # of the key and the value table
        self.rows: RowBackend = LocalRowTable(num_rows, d_in, d_emb, tied_kv)
        self.up = nn.Linear(d_emb, d_up, bias=False)
        self.norm = make_norm(norm, d_up, norm_eps)
        self.mix = nn.Linear(d_up + d_in, d_out or d_in, bias=False)
        self.init_std = init_std
        # The seed of this layer's tables (one draw from the global generator, so the model's
        # other weights do not depend on the table sizes); key table seed, value table seed + 1.
        self.table_seed = int(torch.randint(0, 2**31, (), device="cpu"))
        self.reset_parameters()

    def table_init(self, table: int, rows: Tensor | None = None) -> Tensor:
        """Initial values of rows `rows` (all when None) of table 0 (keys) or 1 (values)."""
        width = self.rows_width[table]
        return init_rows(self.num_rows, width, self.init_std, self.table_seed + table, rows)

    def reset_parameters(self) -> None:
        for table, weight in enumerate(self.rows.parameters()):
            if not weight.is_meta:
                with torch.no_grad():
                    weight.copy_(self.table_init(table))
        for weight in (self.up.weight, self.mix.weight):
            if not weight.is_meta:
                nn.init.normal_(weight, std=self.init_std)

    @property
    def num_rows(self) -> int:
        return int(self.bounds[-1])  # the whole allocation, also when the rows are sharded

    def lookup(self, x: Tensor, token_ids: Tensor | LookupRoutes) -> tuple[Tensor, Tensor]:
        """a = V_tᵀ softmax(K_t x) for every position (any leading shape; `token_ids` of the
        same shape, or their `LookupRoutes`), and each position's softmax entropy (no gradient)."""
        route = LookupRoutes.of(token_ids).route_for(self)
        flat, entropy = self.rows(x.reshape(-1, x.shape[-1]), route)
        return flat.reshape(*x.shape[:-1], flat.shape[-1]), entropy

    def forward(self, x: Tensor, token_ids: Tensor | LookupRoutes) -> tuple[Tensor, Tensor]:
        """The layer's output, and the mean softmax entropy of its lookups (a detached scalar
        for monitoring; reduced by the caller only when it is logged)."""
        attended, entropy = self.lookup(x, token_ids)
        out = self.mix(torch.cat([self.norm(self.up(attended)), x], dim=-1))
        return out, entropy.detach().mean()
