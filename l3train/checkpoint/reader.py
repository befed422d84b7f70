"""The one reader of checkpoints: `open_checkpoint(path)` gives any checkpoint (a consolidated
one, a training checkpoint of any layout, or a run_dir: its latest) as its config, its
tensors under the plain model's names (whole, or a 2-D table in row blocks) and its step;
`allocation()` of the config is its L³ allocation. Generation, evaluation and the tools
read checkpoints through it; the formats behind it are l3train.checkpoint's
(`consolidated`, `convert.TrainingCheckpoint`, `deepspeed_files`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import Tensor

from l3train.checkpoint.consolidated import KIND, Consolidated
from l3train.checkpoint.manifest import read_manifest
from l3train.config import Config
from l3train.errors import L3TrainError


class CheckpointTensors(Protocol):
    """A checkpoint read tensor by tensor under the plain model's names."""

    directory: Path
    config: Config  # its tokenizer and allocation paths name files that exist (`allocation()`)
    files: dict[str, Any]  # the manifest's record of every file (sizes and CRC-32s): the checkpoint's identity
    step: int  # optimizer steps it was trained for

    def tensor(self, name: str) -> Tensor: ...

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Every tensor of the plain model, by name."""
        ...

    def row_chunks(self, name: str, rows: int) -> Iterator[np.ndarray]:
        """Consecutive blocks of at most `rows` rows of the 2-D tensor `name`."""
        ...


class ConsolidatedTensors:
    """A consolidated checkpoint: tensors and row blocks read from its safetensors files."""

    def __init__(self, consolidated: Consolidated) -> None:
        from safetensors import safe_open

        self.directory, self.config = consolidated.directory, consolidated.config
        self.files, self.step = consolidated.manifest["files"], consolidated.step
        self._consolidated = consolidated
        self._file_of = {}
        for path in consolidated.model_files():
            with safe_open(str(path), framework="pt") as handle:
                self._file_of.update({name: path for name in handle.keys()})

    def tensor(self, name: str) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file_of[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self._consolidated.state_dict().items())

    def row_chunks(self, name: str, rows: int) -> Iterator[np.ndarray]:
        from safetensors import safe_open

        with safe_open(str(self._file_of[name]), framework="pt") as handle:
            table = handle.get_slice(name)
            for start in range(0, table.get_shape()[0], rows):
                yield table[start:start + rows].numpy()


class TrainingTensors:
    """A training checkpoint of any layout (l3train.checkpoint.convert.TrainingCheckpoint). A
    sharded table is reassembled whole in memory once when it is read."""

    def __init__(self, path: str | os.PathLike, overrides: list[str], verify: bool) -> None:
        from l3train.checkpoint.convert import TrainingCheckpoint

        self._checkpoint = TrainingCheckpoint(path, overrides, check=verify)
        self.directory, self.config = self._checkpoint.directory, self._checkpoint.config
        self.files, self.step = self._checkpoint.manifest["files"], self._checkpoint.step

    def tensor(self, name: str) -> Tensor:
        return self._checkpoint.tensor(name)

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        return self._checkpoint.tensors()

    def row_chunks(self, name: str, rows: int) -> Iterator[np.ndarray]:
        table = self.tensor(name)
        for start in range(0, table.shape[0], rows):
            yield table[start:start + rows].numpy()


def open_checkpoint(path: str | os.PathLike, overrides: list[str] = (), verify: bool = True) -> CheckpointTensors:
    """A consolidated checkpoint, or a training checkpoint (also a run_dir: its latest one).
    `overrides` (key=value) repoint a training checkpoint's tokenizer or allocation paths."""
    path = Path(path)
    if not path.exists():
        raise L3TrainError(f"checkpoint {path} not found; pass a consolidated checkpoint, a training checkpoint "
                           f"(run_dir/checkpoints/step_*) or a run_dir")
    manifest, _ = read_manifest(path)
    if manifest is not None and manifest.get("kind") == KIND:
        if overrides:
            raise L3TrainError(f"{path} is a consolidated checkpoint: its tokenizer and allocation are inside it, "
                               f"config overrides ({overrides[0]}) apply to training checkpoints only")
        return ConsolidatedTensors(Consolidated(path, check=verify))
    return TrainingTensors(path, list(overrides), verify)
