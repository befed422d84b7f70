"""Checkpoints: DeepSpeed engine state written atomically, a `latest` pointer, pruning, resume.

Layout under `<run_dir>/checkpoints/`:
    step_00000100/   DeepSpeed files (model, optimizer and scheduler states, every rank)
                     + config.yaml (the resolved config) + client state (step)
                     + l3_rows_rank<rank>.pt per rank when the L³ rows are sharded, and
                       experts_rank<rank>.pt per rank under expert parallelism
                       (l3train.parallel.sharded_optim)
    latest           the tag of the newest complete checkpoint

Every rank writes its shards into `.staging/<tag>` first; only when all ranks are done
does rank 0 move the directory into place and then update `latest`. A run killed while
saving therefore leaves the previous checkpoint as `latest`, never a half-written one.
RNG state is not stored: all randomness during training is drawn from generators
seeded by (seed, step, rank), and data order is a function of (seed, step).

Every check that a checkpoint fits this run (architecture keys, parallel layout, per-rank
files) is made here, before the engine is touched. See docs/checkpoints.md.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist
import yaml

from l3train.config import Config
from l3train.trainer import deepspeed_adapter
from l3train.errors import L3TrainError
from l3train.utils.atomic import atomic_write_text

if TYPE_CHECKING:
    from l3train.parallel.parallelize import ParallelModel

# Keys whose change makes a checkpoint unloadable or meaningless: the model and L³
# architecture (the allocation itself travels in the checkpoint as the `bounds` buffers,
# so its file path may change), and the tensor-parallel size (each TP rank's file holds
# its shards; l3train does not reshard them).
_ARCHITECTURE_SECTIONS = ("model", "l3", "moe")
_NOT_ARCHITECTURE = {("l3", "allocation"), ("l3", "lr"), ("l3", "weight_decay"), ("moe", "aux_loss_weight"),
                     ("moe", "z_loss_weight"), ("moe", "capacity_factor")}
_LAYOUT_KEYS = (("parallel", "tensor_parallel"),)


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(root: Path) -> str | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not (root / tag).is_dir():
        raise L3TrainError(f"{pointer} names checkpoint {tag!r}, which does not exist; "
                           f"point it at one of: {', '.join(list_tags(root)) or 'none'}")
    return tag


def list_tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step_*") if p.is_dir())


def save_checkpoint(engine, cfg: Config, step: int, is_main: bool,
                    save_extra: Callable[[Path], None] | None = None) -> Path:
    """Save engine state for `step` (the number of optimizer steps completed). `save_extra`,
    called on every rank with the staging directory of the checkpoint, writes state that
    DeepSpeed does not hold (sharded L³ rows, expert-parallel experts); it is moved into place
    with the rest."""
    root = checkpoint_root(cfg.run_dir)
    staging = root / ".staging"
    tag = tag_for_step(step)
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    deepspeed_adapter.save_engine_checkpoint(engine, str(staging), tag, {"step": step})
    if save_extra is not None:
        save_extra(staging / tag)
    dist.barrier()
    final = root / tag
    if is_main:
        atomic_write_text(staging / tag / "config.yaml", cfg.to_yaml())
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging / tag, final)
        atomic_write_text(root / "latest", tag + "\n")
        shutil.rmtree(staging, ignore_errors=True)
        _prune(root, cfg.checkpoint.keep_last, keep=tag)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` checkpoints, never the one just written (`keep`)."""
    if keep_last > 0:
        for tag in list_tags(root)[:-keep_last]:
            if tag != keep:
                shutil.rmtree(root / tag, ignore_errors=True)


def _check_architecture(cfg: Config, checkpoint_dir: Path) -> None:
    """Refuse a checkpoint written for another architecture, naming the first difference."""
    saved_path = checkpoint_dir / "config.yaml"
    if not saved_path.exists():
        raise L3TrainError(f"{checkpoint_dir} has no config.yaml: it is not a complete l3train checkpoint")
    saved = yaml.safe_load(saved_path.read_text())
    current = cfg.to_dict()
    keys = [(section, key) for section in _ARCHITECTURE_SECTIONS for key in current[section]
            if (section, key) not in _NOT_ARCHITECTURE] + list(_LAYOUT_KEYS)
    for section, key in keys:
        value, saved_value = current[section][key], saved.get(section, {}).get(key)
        if saved_value != value:
            raise L3TrainError(
                f"cannot resume {checkpoint_dir}: it was written with {section}.{key}={saved_value!r} "
                f"but the config has {value!r}; use the same config or a new run_dir")


def _check_rank_files(checkpoint_dir: Path, num_shards: int | None, expert_files: int | None) -> None:
    """Refuse a checkpoint whose L³ rows are sharded over another number of ranks (`num_shards`
    None: this run does not shard them), or whose experts were split into another number of
    per-rank files (`expert_files` None: no expert parallelism)."""
    saved = len(list(checkpoint_dir.glob("l3_rows_rank*.pt")))
    if saved != (num_shards or 0):
        have = f"sharded over {saved} ranks (TP×DP)" if saved else "not sharded"
        want = f"{num_shards} (TP×DP)" if num_shards else "none (one shard)"
        raise L3TrainError(f"cannot resume {checkpoint_dir}: its L³ rows are {have}, this run's shards are {want}; "
                           f"resume with the same TP×DP (resharding checkpoints is not supported)")
    saved = len(list(checkpoint_dir.glob("experts_rank*.pt")))
    if saved != (expert_files or 0):
        have = f"split into {saved} per-rank files" if saved else "not split (no expert parallelism)"
        want = f"{expert_files} ranks" if expert_files else "no expert parallelism"
        raise L3TrainError(f"cannot resume {checkpoint_dir}: its experts are {have}, this run has {want}; "
                           f"resume with the same ranks and moe.expert_parallel (resharding checkpoints is "
                           f"not supported)")


def check_resumable(cfg: Config, checkpoint_dir: Path, parallel_model: ParallelModel, world_size: int) -> None:
    """All checks that `checkpoint_dir` fits this run, before anything is loaded: the
    architecture, the TP size, and the per-rank files of sharded rows and split experts (each
    rank's file is checked against its own shard again when it is read)."""
    _check_architecture(cfg, checkpoint_dir)
    rows = parallel_model.rows
    _check_rank_files(checkpoint_dir, rows.plan.num_shards if rows else None,
                      world_size if parallel_model.experts else None)


def refuse_existing_checkpoints(cfg: Config) -> None:
    """A fresh (non --resume) run must not mix its checkpoints and logs with an older run's."""
    root = checkpoint_root(cfg.run_dir)
    tags = list_tags(root)
    if tags:
        raise L3TrainError(f"run_dir {cfg.run_dir} already holds checkpoints (newest {tags[-1]}); "
                           f"pass --resume to continue that run, or choose another run_dir")


def load_latest_checkpoint(engine, cfg: Config, parallel_model: ParallelModel, rank: int = 0,
                           world_size: int = 1) -> int | None:
    """Load the newest checkpoint of `cfg.run_dir` into `engine` and this rank's rank-local
    tensors (sharded L³ rows, expert-parallel experts); returns its step, or None if none."""
    root = checkpoint_root(cfg.run_dir)
    tag = latest_tag(root)
    if tag is None:
        return None
    check_resumable(cfg, root / tag, parallel_model, world_size)
    try:
        client_state = deepspeed_adapter.load_engine_checkpoint(engine, str(root), tag)
    except (OSError, RuntimeError, KeyError, EOFError, ValueError) as err:
        raise L3TrainError(f"checkpoint {root / tag} is unreadable ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); delete it or point "
                           f"{root / 'latest'} at an older one") from None
    if client_state is None:
        raise L3TrainError(f"checkpoint {root / tag} could not be loaded; delete it or point "
                           f"{root / 'latest'} at an older one")
    for part in parallel_model.rank_local:
        part.load(root / tag, rank)
    return int(client_state["step"])
