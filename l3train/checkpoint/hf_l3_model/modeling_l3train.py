"""An l3train model with Large Lookup Layers (L³), for Hugging Face transformers.

Copied next to the weights by l3train's Hugging Face export and loaded with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`; it imports nothing
from l3train. Written against the transformers 5 API (`cache=` keyword of Llama layers).

The backbone is transformers' own Llama (its decoder layers, RMSNorm and rotary embedding),
so it computes exactly what the dense export's `LlamaForCausalLM` computes. After each
decoder layer listed in `config.l3_after_blocks` an L³ layer adds to the residual stream:

    h += W_mix [ Norm(W_up(V_tᵀ softmax(K_t x))) ; x ],    x = RMSNorm(h),  t = the token id

Token t owns the rows `bounds[t]:bounds[t+1]` of the key table K and the value table V
(one table when `l3_tied_kv`: V = K). Each position depends on its own token and hidden
state only, so the KV cache of the attention layers serves generation unchanged: a decoding
step looks up the rows of the new tokens alone.
"""

import torch
from torch import nn

from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, LlamaPreTrainedModel, LlamaRMSNorm,
                                                      LlamaRotaryEmbedding)

from .configuration_l3train import L3TrainConfig

# Largest number of gathered row entries (rows × features) held at once by `row_attention`,
# so a long prompt is processed in pieces instead of gathering all its rows together.
MAX_GATHERED_ELEMENTS = 1 << 26


def _position_chunks(row_counts: torch.Tensor, max_rows: int) -> list[int]:
    """Sizes of consecutive position ranges that gather about `max_rows` rows each (a range
    exceeds it by at most one position's rows)."""
    chunk_of_position = torch.div(torch.cumsum(row_counts, 0) - 1, max_rows, rounding_mode="floor")
    return torch.unique_consecutive(chunk_of_position, return_counts=True)[1].tolist()


def _row_attention_chunk(x: torch.Tensor, token_ids: torch.Tensor, bounds: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor) -> torch.Tensor:
    """V_tᵀ softmax(K_t x) for positions x (N, d_in) with ids (N,): every position's rows are
    gathered back to back (no padding to the largest token) and each softmax runs over its
    own segment of scores."""
    starts = bounds[token_ids]
    row_counts = bounds[token_ids + 1] - starts
    positions = torch.arange(len(token_ids), device=x.device)
    owner = torch.repeat_interleave(positions, row_counts)  # the position each gathered row serves
    segment_start = torch.cumsum(row_counts, 0) - row_counts
    rows = starts[owner] + torch.arange(owner.numel(), device=x.device) - segment_start[owner]
    # Softmax statistics in fp32 whatever the weights' dtype: bf16 scores lose the maximum.
    scores = (keys[rows] * x[owner]).sum(-1).float()
    peak = scores.new_full((len(token_ids),), float("-inf")).scatter_reduce(0, owner, scores, "amax")
    weights = torch.exp(scores - peak[owner])
    total = torch.zeros_like(peak).index_add(0, owner, weights)
    probs = (weights / total[owner]).to(values.dtype)
    return values.new_zeros(len(token_ids), values.shape[1]).index_add(0, owner, probs[:, None] * values[rows])


def row_attention(x: torch.Tensor, token_ids: torch.Tensor, bounds: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor) -> torch.Tensor:
    """a_p = V_tᵀ softmax(K_t x_p) for every position p of x (N, d_in), t = token_ids[p]."""
    starts, ends = bounds[token_ids], bounds[token_ids + 1]
    max_rows = max(1, MAX_GATHERED_ELEMENTS // max(keys.shape[1], values.shape[1]))
    sizes = _position_chunks(ends - starts, max_rows)
    return torch.cat([_row_attention_chunk(x_part, ids_part, bounds, keys, values)
                      for x_part, ids_part in zip(x.split(sizes), token_ids.split(sizes))])


class LargeLookupLayer(nn.Module):
    """out = W_mix [ Norm(W_up(V_tᵀ softmax(K_t x))) ; x ]."""

    def __init__(self, config: L3TrainConfig) -> None:
        super().__init__()
        self.register_buffer("bounds", torch.zeros(config.vocab_size + 1, dtype=torch.long))
        self.key_table = nn.Parameter(torch.empty(config.l3_num_rows, config.hidden_size))
        self.value_table = (None if config.l3_tied_kv
                            else nn.Parameter(torch.empty(config.l3_num_rows, config.l3_d_emb)))
        self.up = nn.Linear(config.l3_d_emb, config.l3_d_up, bias=False)
        if config.l3_norm == "rms":
            self.norm = LlamaRMSNorm(config.l3_d_up, eps=config.rms_norm_eps)
        elif config.l3_norm == "layer":
            self.norm = nn.LayerNorm(config.l3_d_up, eps=config.rms_norm_eps)
        else:
            raise ValueError(f"l3_norm must be 'rms' or 'layer', got {config.l3_norm!r}")
        self.mix = nn.Linear(config.l3_d_up + config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        values = self.key_table if self.value_table is None else self.value_table
        attended = row_attention(x.reshape(-1, x.shape[-1]), token_ids.reshape(-1), self.bounds,
                                 self.key_table, values).reshape(*x.shape[:-1], -1)
        return self.mix(torch.cat([self.norm(self.up(attended)), x], dim=-1))


class LookupBlock(nn.Module):
    """The residual sublayer around an L³ layer: h + L³(RMSNorm(h), token ids)."""

    def __init__(self, config: L3TrainConfig) -> None:
        super().__init__()
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lookup = LargeLookupLayer(config)

    def forward(self, hidden_states: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.lookup(self.norm(hidden_states), token_ids)


class L3TrainPreTrainedModel(LlamaPreTrainedModel):
    config_class = L3TrainConfig
    _no_split_modules = ["LlamaDecoderLayer", "LookupBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # The tables are bare parameters, which the generic initialisation does not know;
        # `init` skips tensors already loaded from the checkpoint.
        if isinstance(module, LargeLookupLayer):
            for table in (module.key_table, module.value_table):
                if table is not None:
                    init.normal_(table, std=self.config.initializer_range)


class L3TrainModel(L3TrainPreTrainedModel):
    """Llama decoder layers with L³ layers between them; returns the final hidden states."""

    def __init__(self, config: L3TrainConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, index) for index in range(config.num_hidden_layers))
        # Keyed by the decoder layer each follows ("lookups.3" comes after layer 3), as in l3train.
        self.lookups = nn.ModuleDict({str(index): LookupBlock(config) for index in config.l3_after_blocks or []})
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        if input_ids is None:
            raise ValueError("an L³ model looks rows up by token id: pass input_ids (inputs_embeds alone "
                             "cannot be used)")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
                            + past_seen_tokens).unsqueeze(0)
        causal_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                         attention_mask=attention_mask, cache=cache, position_ids=position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden_states = inputs_embeds
        for index, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, attention_mask=causal_mask, position_ids=position_ids, cache=cache,
                                  use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
            if str(index) in self.lookups:
                hidden_states = self.lookups[str(index)](hidden_states, input_ids)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class L3TrainForCausalLM(L3TrainPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: L3TrainConfig) -> None:
        super().__init__(config)
        self.model = L3TrainModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        # Generation needs the last position only; an int keeps that many, a tensor picks positions.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)
