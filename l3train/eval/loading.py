"""Load a checkpoint for evaluation: the plain DecoderLM, fp32, in eval mode.

A training checkpoint of any layout (a run_dir, its checkpoints/ directory or one
step_<N>/ directory) is reassembled tensor by tensor by `TrainingCheckpoint`; a
consolidated checkpoint (tools/convert_checkpoint.py) is read as it is. Either way the
tensors go into the model its config describes, so both give the same numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from l3train.checkpoint.consolidated import KIND, Consolidated, load_model, load_weights
from l3train.checkpoint.convert import TrainingCheckpoint
from l3train.checkpoint.manifest import read_manifest
from l3train.config import Config
from l3train.data.tokenizer import Tokenizer
from l3train.errors import L3TrainError
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

    path = Path(path)
    manifest, _ = read_manifest(path) if path.is_dir() else (None, None)
    if manifest is not None and manifest.get("kind") == KIND:
        if overrides:
            raise L3TrainError(f"{path} is a consolidated checkpoint: it carries its own tokenizer and allocation, "
                               f"config overrides do not apply")
        consolidated = Consolidated(path)
        model, cfg, step = load_model(consolidated), consolidated.config, consolidated.step
    else:
        checkpoint = TrainingCheckpoint(path, list(overrides))
        cfg, step, path = checkpoint.config, checkpoint.step, checkpoint.directory
        model, _ = build_model(cfg)
        load_weights(model, dict(checkpoint.tensors()), cfg.model.tie_embeddings, str(path))
    model.eval()
    return LoadedCheckpoint(model, cfg, step, path)
