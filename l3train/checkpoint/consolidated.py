"""The consolidated checkpoint: one model, no parallelism, readable without l3train's trainer.

A consolidated checkpoint is a directory:

    model.safetensors              every tensor of the plain `DecoderLM` state dict, by its
                                   plain name (`blocks.0.attention.wq.weight`,
                                   `lookups.1.lookup.rows.key_table`, ...), fp32 as trained;
                                   past `max_shard_bytes` split into
                                   model-00001-of-0000N.safetensors + model.safetensors.index.json
                                   (Hugging Face's layout)
    optimizer.safetensors          optional: AdamW's `exp_avg/<name>` and `exp_avg_sq/<name>`
                                   for every trained tensor (sharded like the model)
    config.yaml                    the resolved config of the run, with `l3.allocation` and
                                   `data.tokenizer` naming the copies below
    allocation.npz                 the L³ allocation (models with L³ layers)
    tokenizer.model                the sentencepiece model
    manifest.json                  kind "consolidated", step, tokens seen, the source layout,
                                   and every file's size and CRC-32 (l3train.checkpoint.manifest)

Tensors are written one output shard at a time, in the order they arrive, so the writer
holds at most one shard. The output is deterministic: the same tensors give byte-identical
files (safetensors sorts its header; no timestamps are stored). The directory is built
under a staging name beside the destination and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from l3train.checkpoint.manifest import checksum, read_manifest, verify, write_manifest
from l3train.config import Config, config_from_dict
from l3train.errors import L3TrainError
from l3train.utils.atomic import atomic_directory
from l3train.utils.outputs import refuse_existing

KIND = "consolidated"
MODEL = "model"
OPTIMIZER = "optimizer"
MOMENTS = ("exp_avg", "exp_avg_sq")
ALLOCATION_FILE = "allocation.npz"
TOKENIZER_FILE = "tokenizer.model"
CONFIG_FILE = "config.yaml"
DEFAULT_MAX_SHARD_BYTES = 2 << 30


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def write_safetensors(directory: Path, stem: str, tensors: Iterable[tuple[str, Tensor]],
                       max_shard_bytes: int) -> list[str]:
    """Write `tensors` as `<stem>.safetensors`, or as numbered shards plus an index when they
    exceed `max_shard_bytes`; returns the file names written."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    staged: dict[str, Tensor] = {}
    size, total, weight_map = 0, 0, {}

    def flush() -> None:
        nonlocal staged, size
        if not staged:
            return
        name = f"{stem}-part{len(shards) + 1:05d}.safetensors"
        save_file(staged, str(directory / name), metadata={"format": "pt"})
        shards.append(list(staged))
        staged, size = {}, 0

    for name, tensor in tensors:
        if name in weight_map or name in staged:
            raise ValueError(f"tensor {name} given twice")
        tensor = tensor.detach().to("cpu").contiguous()
        if staged and size + _nbytes(tensor) > max_shard_bytes:
            flush()
        staged[name] = tensor
        size += _nbytes(tensor)
        total += _nbytes(tensor)
        weight_map[name] = len(shards)
    flush()
    if len(shards) == 1:
        os.replace(directory / f"{stem}-part00001.safetensors", directory / f"{stem}.safetensors")
        return [f"{stem}.safetensors"]
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, final in enumerate(names):
        os.replace(directory / f"{stem}-part{i + 1:05d}.safetensors", directory / final)
    index = {"metadata": {"total_size": total},
             "weight_map": {tensor: names[shard] for tensor, shard in sorted(weight_map.items())}}
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*names, f"{stem}.safetensors.index.json"]


@dataclass
class ConsolidatedContents:
    """What a consolidated checkpoint holds besides its tensors."""

    config: Config
    step: int  # optimizer steps completed by the run (0 for an imported model)
    source: dict[str, Any]  # where it came from: the training layout, or the imported folder
    optimizer_step: float | None = None  # AdamW's step count (bias correction), with the moments
    extra: dict[str, Any] = field(default_factory=dict)


def write_consolidated(output: Path, contents: ConsolidatedContents, tensors: Iterable[tuple[str, Tensor]],
                       moments: Iterable[tuple[str, Tensor]] | None = None, *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Write a consolidated checkpoint to `output` atomically (staging directory, then rename).

    `tensors` are (plain name, tensor) pairs; `moments` ("exp_avg/<name>", tensor) pairs or
    None for weights only. The allocation and tokenizer named by the config are copied in."""
    output = Path(output)
    refuse_existing([output], "a consolidated checkpoint", overwrite)
    cfg = contents.config
    with atomic_directory(output) as staging:
        tree = cfg.to_dict()
        shutil.copyfile(cfg.data.tokenizer, staging / TOKENIZER_FILE)
        tree["data"]["tokenizer"] = TOKENIZER_FILE
        if cfg.l3.after_blocks:
            shutil.copyfile(cfg.l3.allocation, staging / ALLOCATION_FILE)
            tree["l3"]["allocation"] = ALLOCATION_FILE
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(tree, sort_keys=False))
        write_safetensors(staging, MODEL, tensors, max_shard_bytes)
        if moments is not None:
            if contents.optimizer_step is None:
                raise ValueError("moments need the optimizer step count")
            write_safetensors(staging, OPTIMIZER, moments, max_shard_bytes)
        files = {path.name: checksum(path) for path in sorted(staging.iterdir())}
        tokens = contents.step * cfg.training.global_batch_size * cfg.data.seq_length
        write_manifest(staging, {"kind": KIND, "step": contents.step, "tokens_seen": tokens,
                                 "optimizer_step": contents.optimizer_step, "source": contents.source,
                                 **contents.extra}, files)
    return output


def _resolve(directory: Path, value: str) -> str:
    return str(directory / value) if value and not os.path.isabs(value) else value


class Consolidated:
    """A verified consolidated checkpoint on disk; tensors are read lazily, one file at a time."""

    def __init__(self, directory: str | os.PathLike, check: bool = True) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise L3TrainError(f"{self.directory} is not a directory; pass a consolidated checkpoint "
                               f"(written by tools/convert_checkpoint.py consolidate)")
        manifest, problem = read_manifest(self.directory)
        if problem is None and manifest.get("kind") != KIND:
            problem = (f"{self.directory} is a {manifest.get('kind', 'training')} checkpoint, not a consolidated "
                       f"one; consolidate it first with tools/convert_checkpoint.py consolidate")
        if problem is None and check:
            problem = verify(self.directory)
        if problem:
            raise L3TrainError(f"{self.directory} is not a usable consolidated checkpoint: {problem}")
        self.manifest = manifest
        tree = yaml.safe_load((self.directory / CONFIG_FILE).read_text())
        tree["data"]["tokenizer"] = _resolve(self.directory, tree["data"]["tokenizer"])
        tree["l3"]["allocation"] = _resolve(self.directory, tree["l3"]["allocation"])
        self.config = config_from_dict(tree)

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def optimizer_step(self) -> float | None:
        return self.manifest.get("optimizer_step")

    @property
    def has_moments(self) -> bool:
        return self._files(OPTIMIZER) != []

    def model_files(self) -> list[Path]:
        """The safetensors files holding the model's tensors."""
        return self._files(MODEL)

    def _files(self, stem: str) -> list[Path]:
        index = self.directory / f"{stem}.safetensors.index.json"
        if index.is_file():
            return [self.directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        single = self.directory / f"{stem}.safetensors"
        return [single] if single.is_file() else []

    def _iterate(self, stem: str) -> Iterator[tuple[str, Tensor]]:
        from safetensors import safe_open

        for path in self._files(stem):
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) of the model, one file open at a time."""
        return self._iterate(MODEL)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: shape} of the model's tensors, from the file headers (no data is read)."""
        from safetensors import safe_open

        shapes = {}
        for path in self.model_files():
            with safe_open(str(path), framework="pt") as handle:
                shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
        return shapes

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.tensors())

    def moments(self) -> dict[str, dict[str, Tensor]]:
        """{"exp_avg": {name: tensor}, "exp_avg_sq": {...}}; empty dicts without optimizer state."""
        out: dict[str, dict[str, Tensor]] = {key: {} for key in MOMENTS}
        for name, tensor in self._iterate(OPTIMIZER):
            key, _, param = name.partition("/")
            out[key][param] = tensor
        return out


def plain_state_dict(model: torch.nn.Module, tie_embeddings: bool) -> dict[str, Tensor]:
    """The tensors a consolidated checkpoint stores for the plain `model`: its state dict
    without a tied output projection (the embedding is stored once)."""
    state = model.state_dict()
    if tie_embeddings:
        state.pop("output.weight")
    return state


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str) -> None:
    """One clear line for a tensor `source` lacks, has in excess, or has in another shape
    than the model described by the config (`expected`: {name: shape})."""
    missing, unknown = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unknown:
        what = f"lacks {missing[0]}" if missing else f"has an unknown tensor {unknown[0]}"
        raise L3TrainError(f"{source} {what} ({len(missing)} missing, {len(unknown)} unknown); it was written "
                           f"for another model: check the config's model, l3 and moe sections")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise L3TrainError(f"{source}: {name} has shape {tuple(found[name])}, the config's model has "
                               f"{tuple(shape)}; check the config's model, l3 and moe sections")


def load_weights(model: torch.nn.Module, tensors: dict[str, Tensor], tie_embeddings: bool, source: str) -> None:
    """Copy `tensors` into the plain `model` after `check_tensors`; buffers (the L³ bounds)
    must equal the model's own."""
    expected = plain_state_dict(model, tie_embeddings)
    check_tensors({name: tuple(t.shape) for name, t in expected.items()},
                  {name: tuple(t.shape) for name, t in tensors.items()}, source)
    for name, target in expected.items():
        value = tensors[name]
        if not target.is_floating_point() and not torch.equal(value, target):
            raise L3TrainError(f"{source}: {name} differs from the model's (the L³ allocation of the checkpoint "
                               f"is not the config's allocation)")
        with torch.no_grad():
            target.copy_(value)


def load_model(consolidated: Consolidated, cfg: Config | None = None) -> torch.nn.Module:
    """The plain DecoderLM of `consolidated` (or of `cfg`, which must describe the same
    model), with its weights loaded."""
    from l3train.model.build import build_model as build_from_config

    cfg = cfg or consolidated.config
    model, _ = build_from_config(cfg)
    load_weights(model, consolidated.state_dict(), cfg.model.tie_embeddings, str(consolidated.directory))
    return model
