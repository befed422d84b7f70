"""Llama backbone with L³ layers, and parameter/FLOP accounting against real modules."""

import numpy as np
import pytest
import torch

from l3train.config import L3Config, ModelConfig
from l3train.model.llama import DecoderLM
from l3train.sizing.accounting import model_stats

SMALL = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden_size=48, max_seq_len=16)


def allocation(vocab, seed=0, cap=20):
    return np.random.RandomState(seed).randint(1, cap, size=vocab)


def test_causal_and_l3_sensitive():
    torch.manual_seed(0)
    model = DecoderLM(SMALL, L3Config(after_blocks=[0, 2], d_emb=32, d_up=40, allocation="a"), allocation(64))
    tokens = torch.randint(0, 64, (2, 16))
    output = model(tokens)
    logits = output.logits
    assert logits.shape == (2, 16, 64)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    new_logits = model(changed).logits
    assert torch.allclose(logits[:, :10], new_logits[:, :10], atol=1e-6)  # no look-ahead
    assert not torch.allclose(logits[:, 10], new_logits[:, 10])
    assert [name for name, _ in model.lookups.named_children()] == ["0", "2"]
    assert sorted(output.l3_entropy) == [0, 2] and all(e.isfinite() for e in output.l3_entropy.values())


def test_l3_rows_receive_gradients_only_for_seen_tokens():
    torch.manual_seed(0)
    rows = allocation(64)
    model = DecoderLM(SMALL, L3Config(after_blocks=[1], d_emb=16, d_up=24, tied_kv=False, allocation="a"), rows)
    tokens = torch.randint(0, 32, (2, 16))  # tokens 32..63 never appear
    model(tokens).logits.sum().backward()
    layer = model.l3_layers()[0]
    seen_rows = int(layer.bounds[32])
    assert layer.rows.key_table.grad[:seen_rows].abs().sum() > 0
    assert layer.rows.value_table.grad[seen_rows:].abs().sum() == 0


def test_tied_embeddings_share_one_tensor():
    model = DecoderLM(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, tie_embeddings=True))
    assert model.output.weight is model.embedding.weight


def test_rejects_allocation_for_another_vocab():
    with pytest.raises(ValueError, match="allocation covers 10 tokens"):
        DecoderLM(SMALL, L3Config(after_blocks=[0], d_emb=32, allocation="a"), np.ones(10, dtype=np.int64))


@pytest.mark.parametrize("model_cfg,l3", [
    (SMALL, L3Config()),
    (SMALL, L3Config(after_blocks=[1], d_emb=32, d_up=40, allocation="a")),
    (ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=8, n_kv_heads=8, ffn_hidden_size=64,
                 tie_embeddings=True), L3Config(after_blocks=[0, 3], d_emb=24, d_up=16, tied_kv=False,
                                                norm="layer", allocation="a")),
])
def test_accounting_equals_instantiated_parameter_count(model_cfg, l3):
    rows = allocation(model_cfg.vocab_size)
    with torch.device("meta"):
        model = DecoderLM(model_cfg, l3, rows if l3.after_blocks else None)
    real_total = sum(p.numel() for p in model.parameters())
    stats = model_stats(model_cfg, l3, seq_length=16, l3_rows=int(rows.sum()), mean_rows_per_token=3.0)
    assert stats.total_params == real_total
    tables = sum(p.numel() for n, p in model.named_parameters() if n.endswith("_table"))
    assert stats.l3_table_params == tables
    row_width = model_cfg.d_model + (0 if l3.tied_kv else l3.d_emb)
    assert stats.active_params == real_total - tables + len(l3.after_blocks) * 3.0 * row_width


def test_flops_count_matmuls_by_hand():
    m = ModelConfig(vocab_size=10, d_model=4, n_layers=1, n_heads=1, n_kv_heads=1, ffn_hidden_size=6)
    l3 = L3Config(after_blocks=[0], d_emb=4, d_up=8, allocation="a")
    stats = model_stats(m, l3, seq_length=7, l3_rows=30, mean_rows_per_token=2.0)
    attention_proj = 4 * 4 * 4  # wq, wk, wv, wo
    ffn = 3 * 4 * 6
    scores = 2 * 4 * 8 // 2  # QK and AV over the mean causal context of (7+1)/2, 2 FLOPs per MAC
    l3_flops = 2.0 * 8 + 4 * 8 + 12 * 4  # rows (keys + values), W_up, W_mix in MACs
    expected = 2 * (attention_proj + ffn) + 2 * scores + 2 * l3_flops + 2 * 10 * 4
    assert stats.flops_per_token == expected
