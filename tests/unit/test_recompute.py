"""Activation recomputation: the same gradients as storing activations, fewer bytes kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l3train.config import L3Config, ModelConfig, MoEConfig
from l3train.model.llama import DecoderLM
from l3train.parallel.recompute import apply_recompute


def model_and_tokens(mode: str) -> tuple[DecoderLM, torch.Tensor]:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden_size=48,
                      max_seq_len=32)
    rows = np.random.default_rng(0).integers(1, 20, size=64)
    model = DecoderLM(cfg, L3Config(after_blocks=[0, 2], d_emb=32, d_up=96), rows,
                      MoEConfig(blocks=[1], num_experts=4, top_k=2, expert_hidden_size=24))
    apply_recompute(model, mode)
    return model, torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(1))


def gradients_and_saved_bytes(mode: str) -> tuple[list[torch.Tensor], int]:
    model, tokens = model_and_tokens(mode)
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(tokens)
        loss = output.logits.square().mean() + sum(stats.aux_loss for stats in output.router.values())
    loss.backward()
    return [param.grad for param in model.parameters()], saved


@pytest.mark.parametrize("mode", ["blocks", "l3"])
def test_recomputation_gives_the_same_gradients_and_keeps_fewer_activations(mode):
    reference, stored = gradients_and_saved_bytes("none")
    gradients, kept = gradients_and_saved_bytes(mode)
    assert len(gradients) == len(reference)
    for got, want in zip(gradients, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert kept < stored * (0.5 if mode == "blocks" else 0.95), (kept, stored)


def test_parameter_names_are_unchanged():
    plain, _ = model_and_tokens("none")
    recomputed, _ = model_and_tokens("blocks")
    assert list(plain.state_dict()) == list(recomputed.state_dict())
