"""`training.recompute=blocks` in a real distributed run (2 ranks, ZeRO-2, sharded L³ rows and
their all-to-all recomputed in backward): the same losses as storing the activations."""

from __future__ import annotations

import pytest
from training_harness import metrics, run_trainer, tiny_l3_config, write_config


@pytest.mark.slow
def test_recomputed_blocks_train_like_stored_activations(tmp_path, tiny_corpus, tiny_allocation):
    tree = tiny_l3_config(tmp_path / "run", tiny_corpus, tiny_allocation)
    tree["training"].update(steps=6, eval_interval=100)
    tree["parallel"]["zero_stage"] = 2
    config = write_config(tmp_path / "config.yaml", tree)
    losses = {}
    for mode in ("none", "blocks"):
        run_trainer(config, f"run_dir={tmp_path / mode}", f"training.recompute={mode}", nproc=2)
        losses[mode] = metrics(tmp_path / mode, "train/loss")
    assert sorted(losses["blocks"]) == list(range(1, 7))
    assert losses["blocks"] == losses["none"]
