"""Consolidate a training checkpoint of any layout into one parallelism-free model.

A training checkpoint (l3train.checkpoint.store) is spread over the ranks that wrote it:

- the dense weights and their AdamW moments are DeepSpeed's, per TP rank a slice of every
  tensor that tensor parallelism splits (`tensor_parallel_dim`), and under ZeRO partitioned
  over the DP ranks: read with DeepSpeed's own reader (`read_weights` in l3train.checkpoint.deepspeed_files);
- the L³ rows, when sharded, are one `l3_rows_rank*.pt` per rank: shard s holds the rows of
  the tokens the shard plan (saved in the file) gives it, in `global_row_indices(s)` order;
- the experts, under expert parallelism, are one `experts_rank*.pt` per rank: EP rank r
  holds experts [r·E/EP, (r+1)·E/EP) of every MoE layer (copies on the other DP ranks).

`TrainingCheckpoint` reassembles each tensor of the plain `DecoderLM` by name, one at a time
(the DeepSpeed and rank-local files are memory-mapped, so a tensor is read when it is
assembled), and `consolidate` writes them as a consolidated checkpoint
(l3train.checkpoint.consolidated). Every name, order and split comes from the plain model
the config describes, built on the meta device: nothing here is specific to one model size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor

from l3train.checkpoint.consolidated import (MOMENTS, ConsolidatedContents, check_tensors, plain_state_dict,
                                             write_consolidated)
from l3train.checkpoint.deepspeed_files import read_weights, read_zero0_moments, read_zero_moments
from l3train.checkpoint.manifest import read_manifest, verify
from l3train.checkpoint.store import checkpoint_root, latest_tag
from l3train.config import Config, config_from_dict
from l3train.errors import L3TrainError
from l3train.model.build import meta_model, names_by_role
from l3train.model.roles import ParamRole
from l3train.optim import named_parameter_groups
from l3train.parallel.shard_plan import ShardPlan, allocation_hash
from l3train.parallel.sharded_optim import rank_file


def resolve_training_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory `path` names: a checkpoint itself, or a run_dir or its
    `checkpoints/` directory (their `latest` checkpoint)."""
    path = Path(path)
    if (path / "manifest.json").is_file() or path.name.startswith("step_"):
        return path
    for root in (checkpoint_root(path), path):
        if (root / "latest").is_file():
            return root / latest_tag(root)
    raise L3TrainError(f"{path} is not a training checkpoint, a run_dir with checkpoints, or a checkpoints/ "
                       f"directory; pass e.g. runs/tiny_l3 or runs/tiny_l3/checkpoints/step_00000500")


def _bounds_names(cfg: Config) -> list[str]:
    return [f"lookups.{block}.lookup.bounds" for block in sorted(cfg.l3.after_blocks)]


class TrainingCheckpoint:
    """A verified training checkpoint, readable tensor by tensor under the plain model's names."""

    def __init__(self, path: str | os.PathLike, overrides: list[str] = (), check: bool = True) -> None:
        self.directory = resolve_training_checkpoint(path)
        manifest, problem = read_manifest(self.directory)
        if problem is None and manifest.get("kind", "training") != "training":
            problem = f"it is a {manifest['kind']} checkpoint, not a training checkpoint"
        if problem is None and check:
            problem = verify(self.directory)
        if problem:
            raise L3TrainError(f"cannot read checkpoint {self.directory}: {problem}")
        self.manifest = manifest
        self.world = manifest["world"]
        # Paths in the saved config may not exist on this machine: overrides repoint them.
        self.config = config_from_dict(yaml.safe_load((self.directory / "config.yaml").read_text()), overrides)
        self.zero_stage = self.world["zero_stage"]
        self.tp_size = self.world["tensor_parallel"]
        self._dense = [read_weights(self.directory, tp, self.zero_stage) for tp in range(self.tp_size)]
        self.rows_per_token = self._rows_per_token()
        self._check_side_files()
        self.model = meta_model(self.config, self.rows_per_token)
        self.names = list(plain_state_dict(self.model, self.config.model.tie_embeddings))
        roles = names_by_role(self.model)
        self.row_names, self.expert_names = roles[ParamRole.L3_ROWS], roles[ParamRole.EXPERT]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    def _rows_per_token(self) -> np.ndarray | None:
        names = _bounds_names(self.config)
        if not names:
            return None
        if names[0] not in self._dense[0]:
            raise L3TrainError(f"{self.directory} has no {names[0]}: it was not written for this config's L³ layers "
                               f"(l3.after_blocks={self.config.l3.after_blocks})")
        return np.diff(self._dense[0][names[0]].contiguous().numpy())

    def _check_side_files(self) -> None:
        """The tokenizer and allocation files the config names exist and are the run's."""
        cfg = self.config
        if not Path(cfg.data.tokenizer).is_file():
            raise L3TrainError(f"tokenizer {cfg.data.tokenizer} (data.tokenizer in {self.directory / 'config.yaml'}) "
                               f"not found; pass data.tokenizer=PATH to the run's sentencepiece model")
        if self.rows_per_token is None:
            return
        from l3train.allocation.allocation import Allocation

        if not Path(cfg.l3.allocation).is_file():
            raise L3TrainError(f"allocation {cfg.l3.allocation} (l3.allocation in {self.directory / 'config.yaml'}) "
                               f"not found; pass l3.allocation=PATH to the run's allocation file")
        saved = allocation_hash(self.rows_per_token)
        found = allocation_hash(Allocation.load(cfg.l3.allocation).rows_per_token)
        if found != saved or self.manifest.get("allocation_hash") not in (None, saved):
            raise L3TrainError(f"allocation {cfg.l3.allocation} has hash {found}, the checkpoint was trained with "
                               f"{saved}; pass l3.allocation=PATH to the run's allocation file")

    @cached_property
    def _rank_files(self) -> dict[str, list[dict]]:
        """The rank-local files by kind, memory-mapped, in rank order."""
        files = {}
        for kind, present in (("l3_rows", self.world["rows_sharded"]), ("experts", self.world["experts_split"])):
            if present:
                files[kind] = [torch.load(self.directory / rank_file(kind, rank), map_location="cpu",
                                          weights_only=False, mmap=True) for rank in range(self.world["world_size"])]
        return files

    def _assemble_rows(self, index: int, key: str | None) -> Tensor:
        """Row table `index` (key, then value table per layer) from every shard; `key` selects a moment."""
        files = self._rank_files["l3_rows"]
        plan = None
        pieces = []
        for rank, state in enumerate(files):
            plan = plan or ShardPlan.from_state_dict(state["layout"]["plan"], expect_rows_per_token=self.rows_per_token,
                                                     expect_num_shards=len(files),
                                                     source=str(self.directory / rank_file("l3_rows", rank)))
            local = state["tensors"][index] if key is None else state["optimizer"]["state"][index][key]
            pieces.append((plan.global_row_indices(state["layout"]["shard"]), local))
        full = torch.empty(int(self.rows_per_token.sum()), pieces[0][1].shape[1], dtype=pieces[0][1].dtype)
        covered = np.zeros(full.shape[0], dtype=np.int64)
        for rows, local in pieces:
            full[torch.as_tensor(rows, dtype=torch.long)] = local
            covered[rows] += 1
        if not (covered == 1).all():
            raise L3TrainError(f"{self.directory}: the shards do not hold every L³ row exactly once; a rank file "
                               f"is missing or from another run")
        return full

    def _assemble_experts(self, index: int, key: str | None) -> Tensor:
        """Stacked expert tensor `index` (w1, w3, w2 per MoE layer) from one rank per EP rank."""
        by_ep_rank = {}
        for state in self._rank_files["experts"]:
            by_ep_rank.setdefault(state["layout"]["ep_rank"], state)
        parts = [state["tensors"][index] if key is None else state["optimizer"]["state"][index][key]
                 for _, state in sorted(by_ep_rank.items())]
        return torch.cat(parts, dim=0)

    def _merge_tensor_parallel(self, name: str, per_tp_rank: list[dict[str, Tensor]]) -> Tensor:
        from l3train.parallel.tp_dims import tensor_parallel_dim

        if any(name not in tensors for tensors in per_tp_rank):
            raise L3TrainError(f"{self.directory} lacks {name}; it was written for another model than its "
                               f"config.yaml describes")
        dim = tensor_parallel_dim(name) if self.tp_size > 1 else None
        if dim is None:
            return per_tp_rank[0][name].contiguous()
        return torch.cat([tensors[name].contiguous() for tensors in per_tp_rank], dim=dim)

    def tensor(self, name: str) -> Tensor:
        """The whole fp32 tensor `name` of the plain model (buffers included), detached: DeepSpeed
        saves its fp32 master partitions as Parameters, which `torch.load` returns requiring grad."""
        if name in self.row_names and "l3_rows" in self._rank_files:
            tensor = self._assemble_rows(self.row_names.index(name), None)
        elif name in self.expert_names and "experts" in self._rank_files:
            tensor = self._assemble_experts(self.expert_names.index(name), None)
        else:
            tensor = self._merge_tensor_parallel(name, self._dense)
        return tensor.detach()

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) in the plain model's order, each checked against the config's shape."""
        expected = plain_state_dict(self.model, self.config.model.tie_embeddings)
        for name in self.names:
            tensor = self.tensor(name)
            check_tensors({name: tuple(expected[name].shape)}, {name: tuple(tensor.shape)}, str(self.directory))
            yield name, tensor

    @cached_property
    def _dense_moments(self) -> tuple[list[dict[str, dict[str, Tensor]]], float]:
        rank_local = set(self.row_names) if "l3_rows" in self._rank_files else set()
        rank_local |= set(self.expert_names) if "experts" in self._rank_files else set()
        if self.zero_stage == 0:
            # The engine's optimizer holds the parameters outside the rank-local ones, by group.
            names = [name for _, members in named_parameter_groups(self.model) for name, _ in members
                     if name not in rank_local]
            read = [read_zero0_moments(self.directory, tp, names) for tp in range(self.tp_size)]
        else:
            read = [read_zero_moments(self.directory, tp) for tp in range(self.tp_size)]
        return [moments for moments, _ in read], self._one_step([step for _, step in read])

    def _one_step(self, steps: list[float]) -> float:
        if len(set(steps)) != 1:
            raise L3TrainError(f"{self.directory}: the optimizers record different step counts {sorted(set(steps))}")
        return steps[0]

    @property
    def optimizer_step(self) -> float:
        """AdamW's step count (steps skipped for non-finite gradients do not count); 0 for an
        optimizer that has not stepped yet (a checkpoint resharded with --weights-only)."""
        steps = [self._dense_moments[1]]
        for files in self._rank_files.values():
            steps += [float(state["optimizer"]["state"].get(0, {}).get("step", 0.0)) for state in files]
        return self._one_step(steps)

    def moments(self) -> Iterator[tuple[str, Tensor]]:
        """("exp_avg/<name>", tensor) and ("exp_avg_sq/<name>", tensor) for every trained tensor
        (zeros before the optimizer's first step, when it holds no state yet)."""
        dense, _ = self._dense_moments
        fresh = self.optimizer_step == 0
        trained = [(name, param) for _, members in named_parameter_groups(self.model) for name, param in members]
        for key in MOMENTS:
            for name, param in trained:
                if fresh:
                    value = torch.zeros(param.shape, dtype=torch.float32)
                elif name in self.row_names and "l3_rows" in self._rank_files:
                    value = self._assemble_rows(self.row_names.index(name), key)
                elif name in self.expert_names and "experts" in self._rank_files:
                    value = self._assemble_experts(self.expert_names.index(name), key)
                else:
                    value = self._merge_tensor_parallel(name, [moments[key] for moments in dense])
                yield f"{key}/{name}", value


def consolidate(path: str | os.PathLike, output: str | os.PathLike, overrides: list[str] = (),
                with_optimizer: bool = False, max_shard_bytes: int | None = None, overwrite: bool = False,
                progress: bool = True) -> Path:
    """Write the training checkpoint at `path` (any layout) as a consolidated checkpoint at
    `output`; with `with_optimizer`, AdamW's moments and step count too."""
    from tqdm import tqdm

    source = TrainingCheckpoint(path, overrides)
    trained = sum(len(members) for _, members in named_parameter_groups(source.model))
    total = len(source.names) + 2 * trained * with_optimizer
    # None: shown on a terminal only, so that logs and error output stay clean.
    bar = tqdm(total=total, desc="consolidate", unit="tensor", disable=None if progress else True)

    def counted(pairs: Iterator[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        for pair in pairs:
            bar.update()
            yield pair

    contents = ConsolidatedContents(source.config, source.step, {
        "kind": "training", "checkpoint": str(source.directory.resolve()), "world": source.world,
        "allocation_hash": source.manifest.get("allocation_hash")},
        optimizer_step=source.optimizer_step if with_optimizer else None)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    try:
        return write_consolidated(Path(output), contents, counted(source.tensors()),
                                  counted(source.moments()) if with_optimizer else None, overwrite=overwrite,
                                  **kwargs)
    finally:
        bar.close()
