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

The tables are initialised by `init_rows`, which gives any subset of rows exactly the
values the whole table would hold, so a rank can build only its own rows: layers built
under `deferred_row_tables()` leave their tables on the meta device (no memory), and the
parallel step creates each rank's rows directly (l3train.parallel.sharded_l3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from l3train.model.l3_attention import row_attention_with_entropy
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
    """Where a layer's rows live: (x (N, d_in), token_ids (N,), bounds) → (a (N, d_emb), entropy (N,))."""

    def __call__(self, x: Tensor, token_ids: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor]: ...


class LocalRowTable(nn.Module):
    """All rows of every token in this process: K, and V when untied, as parameters."""

    parameter_role = ParamRole.L3_ROWS

    def __init__(self, num_rows: int, d_in: int, d_emb: int, tied_kv: bool) -> None:
        super().__init__()
        device = "meta" if _deferred else None
        self.key_table = nn.Parameter(torch.empty(num_rows, d_in, device=device))
        self.value_table = None if tied_kv else nn.Parameter(torch.empty(num_rows, d_emb, device=device))

    def tables(self) -> tuple[Tensor, Tensor]:
        """(K, V); the same tensor twice when tied."""
        return self.key_table, self.key_table if self.value_table is None else self.value_table

    def forward(self, x: Tensor, token_ids: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = self.tables()
        return row_attention_with_entropy(x, token_ids, bounds, keys, values)


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

    def lookup(self, x: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """a = V_tᵀ softmax(K_t x) for every position (any leading shape), and each position's
        softmax entropy (no gradient)."""
        flat, entropy = self.rows(x.reshape(-1, x.shape[-1]), token_ids.reshape(-1), self.bounds)
        return flat.reshape(*x.shape[:-1], flat.shape[-1]), entropy

    def forward(self, x: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The layer's output, and the mean softmax entropy of its lookups (a detached scalar
        for monitoring; reduced by the caller only when it is logged)."""
        attended, entropy = self.lookup(x, token_ids)
        out = self.mix(torch.cat([self.norm(self.up(attended)), x], dim=-1))
        return out, entropy.detach().mean()
