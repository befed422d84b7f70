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
"""

from __future__ import annotations

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


class RowBackend(Protocol):
    """Where a layer's rows live: (x (N, d_in), token_ids (N,), bounds) → (a (N, d_emb), entropy (N,))."""

    def __call__(self, x: Tensor, token_ids: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor]: ...


class LocalRowTable(nn.Module):
    """All rows of every token in this process: K, and V when untied, as parameters."""

    parameter_role = ParamRole.L3_ROWS

    def __init__(self, num_rows: int, d_in: int, d_emb: int, tied_kv: bool) -> None:
        super().__init__()
        self.key_table = nn.Parameter(torch.empty(num_rows, d_in))
        self.value_table = None if tied_kv else nn.Parameter(torch.empty(num_rows, d_emb))

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
        self.rows: RowBackend = LocalRowTable(num_rows, d_in, d_emb, tied_kv)
        self.up = nn.Linear(d_emb, d_up, bias=False)
        self.norm = make_norm(norm, d_up, norm_eps)
        self.mix = nn.Linear(d_up + d_in, d_out or d_in, bias=False)
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (*self.rows.parameters(), self.up.weight, self.mix.weight):
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
