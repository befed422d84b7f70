"""The key/value cache of incremental decoding, for a batch of left-padded sequences.

Prompts of different lengths are left-padded to a common width, so every sequence's next
token sits in the same column. Column c of sequence b holds its position c - pad[b]
(the RoPE angle); a new position may attend to the real (non-padding) columns up to its
own. A padding column attends to itself only: its output is never used, but an empty
softmax would be NaN, and NaN keys or values would leak through zero attention weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from l3train.model.llama import DecoderLM


class KVCache:
    """Keys and values of every block, (blocks, batch, kv_heads, capacity, head_dim) each;
    implements `l3train.model.llama.DecoderCache`."""

    def __init__(self, n_blocks: int, pad_lengths: Tensor, capacity: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (n_blocks, len(pad_lengths), n_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.pad_lengths = pad_lengths.to(device=device, dtype=torch.long)
        self.capacity = capacity
        self.length = 0  # columns filled so far (the same for every sequence)
        self.mask: Tensor | None = None  # (batch, 1, new positions, length): set by `extend`

    @classmethod
    def for_model(cls, model: DecoderLM, pad_lengths: Tensor, capacity: int) -> KVCache:
        """An empty cache for `model`'s blocks, `len(pad_lengths)` sequences and `capacity` columns."""
        cfg = model.cfg
        if capacity > cfg.max_seq_len:
            raise ValueError(f"a cache of {capacity} positions exceeds model.max_seq_len {cfg.max_seq_len}")
        weight = model.embedding.weight
        return cls(cfg.n_layers, pad_lengths, capacity, cfg.n_kv_heads, cfg.d_model // cfg.n_heads,
                   weight.dtype, weight.device)

    def extend(self, seq: int) -> Tensor:
        """Take the next `seq` columns; returns their positions within each sequence (batch, seq)."""
        start, end = self.length, self.length + seq
        if end > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions, {end} requested")
        self.length = end
        device = self.pad_lengths.device
        columns = torch.arange(start, end, device=device)
        keys = torch.arange(end, device=device)
        real = keys[None, :] >= self.pad_lengths[:, None]  # (batch, end)
        causal = keys[None, :] <= columns[:, None]  # (seq, end)
        itself = keys[None, :] == columns[:, None]
        self.mask = ((causal[None] & real[:, None]) | itself[None]).unsqueeze(1)
        return (columns[None, :] - self.pad_lengths[:, None]).clamp_min(0)

    def layer(self, block: int) -> BlockCache:
        return BlockCache(self, block)


class BlockCache:
    """One block's view of a `KVCache` (implements `l3train.model.llama.AttentionCache`)."""

    def __init__(self, cache: KVCache, block: int) -> None:
        self.cache, self.block = cache, block

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cache = self.cache
        start = cache.length - k.shape[2]  # `extend` already took the new columns
        cache.keys[self.block, :, :, start:cache.length] = k
        cache.values[self.block, :, :, start:cache.length] = v
        return (cache.keys[self.block, :, :, :cache.length], cache.values[self.block, :, :, :cache.length],
                cache.mask)
