"""Load a checkpoint for evaluation: the plain DecoderLM, fp32, in eval mode.

Any checkpoint is read through l3train.checkpoint.reader (a training checkpoint of any
layout is reassembled tensor by tensor; a consolidated one is read as it is); either way
the tensors go into the model its config describes, so both give the same numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from l3train.checkpoint.consolidated import load_weights
from l3train.checkpoint.reader import open_checkpoint
from l3train.config import Config
from l3train.data.tokenizer import Tokenizer
from l3train.model.llama import DecoderLM


@dataclass
class LoadedCheckpoint:
    """A model ready for evaluation and what it came from."""

    model: DecoderLM
    config: Config  # paths (tokenizer, allocation) resolved to files that exist
    step: int  # optimizer steps the checkpoint was trained for
    directory: Path

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.config.data.tokenizer)


def load_checkpoint_model(path: str | os.PathLike, overrides: list[str] = ()) -> LoadedCheckpoint:
    """The plain model of the training or consolidated checkpoint at `path`, in eval mode.

    `overrides` (`key.sub=value`) repoint paths of a training checkpoint's config that do not
    exist on this machine (data.tokenizer, l3.allocation); a consolidated checkpoint carries
    its own tokenizer and allocation and takes none."""
    from l3train.model.build import build_model

    checkpoint = open_checkpoint(path, list(overrides))
    cfg = checkpoint.config
    model, _ = build_model(cfg)
    load_weights(model, dict(checkpoint.tensors()), cfg.model.tie_embeddings, str(checkpoint.directory))
    model.eval()
    return LoadedCheckpoint(model, cfg, checkpoint.step, Path(checkpoint.directory))
