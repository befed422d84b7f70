"""The generation engine: prefill and incremental decoding of a batch of prompts.

    prompts → left-pad → [start_step(ids) → model(ids, cache) → sample] until every
    sequence has stopped or max_new_tokens

The first forward (prefill) runs the whole padded prompts and fills the KV cache; every
later one runs one new token per sequence. `TablePlacement.start_step` is called as soon
as the ids of a forward are known (the prompts, then each sampled token), so the L³ rows
they need are staged while the blocks before the first L³ layer run (docs/inference.md).
A sequence stops at one of the stop tokens (not part of its output) or after
`max_new_tokens`; the batch runs until all have stopped, feeding stopped sequences a
padding token whose results are ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from l3train.errors import L3TrainError
from l3train.inference.config import InferenceConfig
from l3train.inference.kv_cache import KVCache
from l3train.inference.placement import TablePlacement
from l3train.inference.sampling import Sampler
from l3train.model.llama import DecoderLM


@dataclass
class GenerationStep:
    """One decoding step of the batch."""

    tokens: list[int | None]  # each sequence's new token; None once it has stopped (or when it stops now)
    logits: Tensor  # (batch, vocab) fp32 on the CPU: the model's output the tokens were drawn from


@dataclass
class Generation:
    """The result of `Generator.generate`."""

    tokens: list[list[int]]  # the new tokens of each prompt (without the stop token)
    finish_reasons: list[str]  # "stop" (a stop token) or "length" (max_new_tokens)
    steps: list[GenerationStep] = field(repr=False)


class Generator:
    """Generates from a model whose L³ tables are placed by `placement`."""

    def __init__(self, model: DecoderLM, placement: TablePlacement, pad_id: int = 0) -> None:
        self.model, self.placement, self.pad_id = model, placement, pad_id

    def stream(self, prompts: list[list[int]], config: InferenceConfig) -> Iterator[GenerationStep]:
        """Every decoding step as soon as its tokens are drawn. The prompts are checked now, not at
        the first step: a caller that got a stream can show the prompt before any step."""
        self._check(prompts, config)
        return self._steps(prompts, config)

    def _check(self, prompts: list[list[int]], config: InferenceConfig) -> None:
        if not prompts or any(not prompt for prompt in prompts):
            raise L3TrainError("every prompt needs at least one token")
        vocab, limit = self.model.cfg.vocab_size, self.model.cfg.max_seq_len
        if any(not 0 <= token < vocab for prompt in prompts for token in prompt):
            raise L3TrainError(f"prompt token ids must be in [0, {vocab})")
        width = max(len(prompt) for prompt in prompts)
        if width + config.max_new_tokens - 1 > limit:
            raise L3TrainError(f"a prompt of {width} tokens plus {config.max_new_tokens} new tokens exceeds the "
                               f"model's max_seq_len {limit}; shorten the prompt or lower max new tokens")

    def _steps(self, prompts: list[list[int]], config: InferenceConfig) -> Iterator[GenerationStep]:
        width = max(len(prompt) for prompt in prompts)
        pad_lengths = torch.tensor([width - len(prompt) for prompt in prompts])
        ids = torch.tensor([[self.pad_id] * (width - len(prompt)) + prompt for prompt in prompts])
        # The last token drawn is never fed back, hence the - 1.
        cache = KVCache.for_model(self.model, pad_lengths, width + config.max_new_tokens - 1)
        sampler = Sampler(config.temperature, config.top_k, config.top_p,
                          [config.seed + index for index in range(len(prompts))])
        stop = set(config.stop_tokens)
        active = [True] * len(prompts)
        for step in range(config.max_new_tokens):
            # Not around the loop: a `with` spanning the `yield` would disable gradients in the caller too.
            with torch.no_grad():
                logits = self.model(self.placement.start_step(ids), cache).logits[:, -1].float().cpu()
            drawn = sampler(logits, active).tolist()
            tokens = [token if running and token not in stop else None for token, running in zip(drawn, active)]
            active = [token is not None for token in tokens]
            yield GenerationStep(tokens, logits)
            if not any(active) or step == config.max_new_tokens - 1:
                return
            ids = torch.tensor([[token if token is not None else self.pad_id] for token in tokens])

    def generate(self, prompts: list[list[int]], config: InferenceConfig) -> Generation:
        """Run `stream` to the end."""
        steps = list(self.stream(prompts, config))
        tokens: list[list[int]] = [[] for _ in prompts]
        for step in steps:
            for index, token in enumerate(step.tokens):
                if token is not None:
                    tokens[index].append(token)
        reasons = ["length" if len(new) == config.max_new_tokens else "stop" for new in tokens]
        return Generation(tokens, reasons, steps)
