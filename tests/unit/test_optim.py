"""Parameter groups (L³ rows get their own lr/weight decay) and the warmup + cosine schedule."""

import numpy as np
import pytest

from l3train.config import config_from_dict
from l3train.model.llama import DecoderLM
from l3train.optim import build_optimizer, build_scheduler, lr_multiplier


def tiny_config(**l3):
    return config_from_dict({
        "model": {"vocab_size": 32, "d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2,
                  "ffn_hidden_size": 32, "max_seq_len": 16},
        "l3": {"after_blocks": [0], "d_emb": 16, "d_up": 16, "allocation": "unused.npz", **l3},
        "data": {"seq_length": 16},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "weight_decay": 0.1},
        "training": {"steps": 110},
    })


def test_l3_rows_have_their_own_group():
    cfg = tiny_config(lr=5e-2, weight_decay=0.01, tied_kv=False, d_emb=8)
    model = DecoderLM(cfg.model, cfg.l3, np.full(32, 3))
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    assert set(groups) == {"dense", "no_decay", "l3_rows"}
    table_ids = {id(model.l3_layers()[0].rows.key_table), id(model.l3_layers()[0].rows.value_table)}
    assert {id(p) for p in groups["l3_rows"]["params"]} == table_ids
    assert groups["l3_rows"]["lr"] == 5e-2 and groups["l3_rows"]["weight_decay"] == 0.01
    assert groups["dense"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in groups["no_decay"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_l3_lr_defaults_to_optimizer_lr():
    cfg = tiny_config()
    model = DecoderLM(cfg.model, cfg.l3, np.full(32, 3))
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    assert groups["l3_rows"]["lr"] == 1e-3


def test_warmup_then_cosine_to_min_lr():
    cfg = tiny_config()
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_multiplier(110, cfg) == pytest.approx(0.1)  # min_lr / lr
    model = DecoderLM(cfg.model, cfg.l3, np.full(32, 3))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    for _ in range(9):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3] * 3)
