"""Configuration of an l3train model with Large Lookup Layers, for Hugging Face transformers.

Copied next to the weights by l3train's Hugging Face export and loaded with
`trust_remote_code=True`; it imports nothing from l3train. The backbone is a Llama, so every
Llama field keeps its meaning; the `l3_*` fields describe the L³ layers:

    l3_after_blocks   0-based decoder layers each followed by an L³ layer
    l3_num_rows       rows of each key (and value) table: the allocation's total
    l3_d_emb          value width (equals hidden_size when keys and values are tied)
    l3_d_up           width of the up-projection W_up
    l3_tied_kv        one table serves as keys and values (V = K)
    l3_norm           "rms" or "layer": the norm after W_up

Which rows belong to which token is not configuration but data: the `bounds` buffer of each
layer, stored with the weights (one int64 per vocabulary entry).
"""

from __future__ import annotations

from transformers import LlamaConfig


class L3TrainConfig(LlamaConfig):
    model_type = "l3train"

    l3_after_blocks: list[int] | None = None
    l3_num_rows: int = 0
    l3_d_emb: int = 0
    l3_d_up: int = 0
    l3_tied_kv: bool = True
    l3_norm: str = "rms"
