"""Drawing the next token from logits: greedy, or temperature with top-k / top-p filtering.

Each sequence of a batch has its own `torch.Generator`, so what one sequence draws never
depends on the others: a prompt gives the same tokens alone or in a batch, for a seed.
Sampling runs on the CPU (the logits are moved there anyway to stream the tokens), which
also makes the draws independent of the compute device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Scaled scores (batch, vocab) with the tokens outside the top-k and the top-p nucleus at -inf.

    top-p keeps the smallest set of most likely tokens whose probability reaches `top_p`
    (always at least the most likely one); `top_k` 0 and `top_p` 1 keep everything."""
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # A token is dropped when the tokens before it already reach top_p.
        before = torch.cumsum(probs, dim=-1) - probs
        dropped = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, before >= top_p)
        scores = scores.masked_fill(dropped, float("-inf"))
    return scores


class Sampler:
    """Draws one token per sequence; `seeds` give each sequence its generator."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seeds: list[int]) -> None:
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, logits: Tensor, active: list[bool]) -> Tensor:
        """Next token ids (batch,) from CPU logits (batch, vocab); only `active` sequences draw
        (and advance their generator), the others get token 0."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(filter_logits(logits, self.temperature, self.top_k, self.top_p), dim=-1)
        tokens = torch.zeros(len(logits), dtype=torch.long)
        for index, generator in enumerate(self.generators):
            if active[index]:
                tokens[index] = torch.multinomial(probs[index], 1, generator=generator)[0]
        return tokens
