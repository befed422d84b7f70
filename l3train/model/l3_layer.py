"""The Large Lookup Layer:  out = W_mix [ Norm(W_up(V_tᵀ softmax(K_t x))) ; x ].

Each token id t owns the contiguous rows `bounds[t]:bounds[t+1]` of the key table K and
the value table V (one table when `tied_kv`: K = V, which needs d_emb = d_in). The
allocation of rows to tokens (the LZW allocation) is a persistent buffer: it is saved
and loaded with the weights, because a table without its allocation is meaningless.

This module holds no parallelism. Sharding the rows over ranks (l3train.parallel) wraps
this layer and reuses `row_attention`, it never re-implements the formula.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from l3train.model.l3_attention import row_attention_with_entropy
from l3train.model.norms import make_norm


def bounds_from_rows(rows_per_token: Tensor | np.ndarray) -> Tensor:
    """Row offsets (vocab+1,) from rows per token (vocab,): token t owns bounds[t]:bounds[t+1]."""
    rows = torch.as_tensor(np.asarray(rows_per_token), dtype=torch.long)
    return torch.cat([rows.new_zeros(1), torch.cumsum(rows, 0)])


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
        self.key_table = nn.Parameter(torch.empty(num_rows, d_in))
        self.value_table = None if tied_kv else nn.Parameter(torch.empty(num_rows, d_emb))
        self.up = nn.Linear(d_emb, d_up, bias=False)
        self.norm = make_norm(norm, d_up, norm_eps)
        self.mix = nn.Linear(d_up + d_in, d_out or d_in, bias=False)
        self.init_std = init_std
        # The one seam for parallelism: l3train.parallel swaps in a sharded implementation
        # with the same contract; the formula below never changes.
        self.row_attention = row_attention_with_entropy
        # Mean softmax entropy of the last forward pass (nats), for monitoring only.
        self.last_entropy: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (self.key_table, self.value_table, self.up.weight, self.mix.weight):
            if weight is not None and not weight.is_meta:
                nn.init.normal_(weight, std=self.init_std)

    @property
    def num_rows(self) -> int:
        return int(self.bounds[-1])  # the whole allocation, also once the rows are sharded

    def tables(self) -> tuple[Tensor, Tensor]:
        """(K, V); the same tensor twice when tied. (None, None) once l3train.parallel has moved
        the rows into a sharded `row_attention`, which then uses its own tables."""
        return self.key_table, self.key_table if self.tied_kv else self.value_table

    def lookup(self, x: Tensor, token_ids: Tensor) -> Tensor:
        """a = V_tᵀ softmax(K_t x) for every position (any leading shape)."""
        keys, values = self.tables()
        flat, entropy = self.row_attention(
            x.reshape(-1, x.shape[-1]), token_ids.reshape(-1), self.bounds, keys, values)
        self.last_entropy = entropy.mean().detach() if entropy.numel() else None
        return flat.reshape(*x.shape[:-1], flat.shape[-1])

    def forward(self, x: Tensor, token_ids: Tensor) -> Tensor:
        lookup = self.norm(self.up(self.lookup(x, token_ids)))
        return self.mix(torch.cat([lookup, x], dim=-1))
