"""Checkpoints: written atomically with a verifiable manifest, a `latest` pointer, pruning, resume.

Layout under `<run_dir>/checkpoints/`:
    step_00000100/   DeepSpeed files (model, optimizer and scheduler states, every rank)
                     + config.yaml (the resolved config) + client state (step)
                     + l3_rows_rank<rank>.pt per rank when the L³ rows are sharded, and
                       experts_rank<rank>.pt per rank under expert parallelism
                       (l3train.parallel.sharded_optim)
                     + manifest.json, written last (l3train.checkpoint.manifest)
    latest           the tag of the newest complete checkpoint

Every rank writes its shards into `.staging/<tag>` first; the ranks then checksum and
fsync the files between them, rank 0 writes the manifest, fsyncs the directories, moves
the checkpoint into place and only then updates `latest`. A run killed at any moment
therefore leaves `latest` naming a complete, verifiable checkpoint.
RNG state is not stored: all randomness during training is drawn from generators
seeded by (seed, step, rank), and data order is a function of (seed, step).

A resume verifies the checkpoint's files against its manifest, then its identity (world
layout, allocation, shard ownership) and config against this run's, before the engine is
touched. See docs/checkpoints.md.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch.distributed as dist
import yaml

from l3train.checkpoint.config_change import check_config_change
from l3train.checkpoint.deepspeed_files import load_engine_checkpoint, save_engine_checkpoint
from l3train.checkpoint.manifest import checkpoint_files, checksum, read_manifest, verify, write_manifest
from l3train.config import Config, WorldLayout
from l3train.errors import L3TrainError
from l3train.parallel.shard_plan import ShardPlan, allocation_hash
from l3train.utils.atomic import atomic_write_text, sync_directory

if TYPE_CHECKING:
    from l3train.parallel.parallelize import ParallelModel


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def list_tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step_*") if p.is_dir())


def latest_tag(root: Path) -> str | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not (root / tag).is_dir():
        raise L3TrainError(f"{pointer} names checkpoint {tag!r}, which does not exist; "
                           f"point it at one of: {', '.join(list_tags(root)) or 'none'}")
    return tag


def run_identity(layout: WorldLayout, rows_per_token: np.ndarray | None, plan: ShardPlan | None) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it, besides its config (the ZeRO
    stage is the one DeepSpeed runs, `layout.zero_stage`: it decides the files' layout)."""
    return {"world": {"world_size": layout.world_size, "tensor_parallel": layout.tensor_parallel,
                      "data_parallel": layout.data_parallel, "expert_parallel": layout.expert_parallel,
                      "zero_stage": layout.zero_stage, "rows_sharded": layout.rows_sharded,
                      "experts_split": layout.experts_split},
            "allocation_hash": None if rows_per_token is None else allocation_hash(rows_per_token),
            "shard_ownership_hash": None if plan is None else plan.ownership_hash}


def _all_gather(value: Any, world_size: int) -> list[Any]:
    gathered = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def _checksum_shares(directory: Path, rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """Checksum (and fsync) every file of `directory`, each rank a share; all ranks get all."""
    names = [checkpoint_files(directory) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    mine = {name: checksum(directory / name, sync=True) for name in names[0][rank::world_size]}
    return {name: entry for share in _all_gather(mine, world_size) for name, entry in share.items()}


def _sync_tree(directory: Path) -> None:
    for path in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        sync_directory(path)
    sync_directory(directory)


STAGING = ".staging"


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.0f} MB"


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _checkpoint_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def _intact(root: Path) -> str:
    tag = latest_tag(root)
    return f"{root / tag} is intact" if tag else "no checkpoint was saved before"


def _space_problem(root: Path, tag: str) -> str | None:
    """Why `tag` cannot be saved: less free space than the last checkpoint took (None: go ahead,
    or there is no checkpoint yet to go by)."""
    last = latest_tag(root)
    if last is None:
        return None
    needed, free = _checkpoint_bytes(root / last), _free_bytes(root)
    if free >= needed:
        return None
    return (f"not enough space to save checkpoint {tag}: {_megabytes(free)} free on the filesystem of {root}, "
            f"the last checkpoint took {_megabytes(needed)}; {_intact(root)}; free space (or lower "
            f"checkpoint.keep_last), then continue with --resume")


def clear_abandoned_staging(run_dir: str | os.PathLike) -> str | None:
    """Remove what a save killed midway left in the staging folder (only the run's own trainer,
    holding its lock, may call this); returns the line to log, None if there was nothing."""
    staging = checkpoint_root(run_dir) / STAGING
    if not staging.exists():
        return None
    size = _checkpoint_bytes(staging)
    shutil.rmtree(staging)
    return f"removed {staging} ({_megabytes(size)}): the staging of a checkpoint save that did not finish"


def no_space_message(run_dir: str | os.PathLike, error: OSError) -> str:
    """One line for a full disk before training starts, naming what of the run takes space."""
    staging = checkpoint_root(run_dir) / STAGING
    held = (f"; {staging} holds {_megabytes(_checkpoint_bytes(staging))} of an unfinished checkpoint save, which "
            f"--resume removes once it can start" if staging.exists() else "")
    return (f"no space left on the filesystem of {run_dir} ({_megabytes(_free_bytes(Path(run_dir)))} free; "
            f"{error.strerror}){held}; free space, then continue with --resume")


def save_checkpoint(engine, cfg: Config, step: int, identity: dict[str, Any], parts: ParallelModel,
                    rank: int, world_size: int) -> Path:
    """Save engine state and this rank's rank-local tensors (`parts`) for `step` (the number
    of optimizer steps completed); collective over all ranks. Refused before writing when the
    free space is below the last checkpoint's size; a save that fails midway (a full disk)
    removes its staging and raises one line on every rank."""
    root = checkpoint_root(cfg.run_dir)
    staging, tag = root / STAGING, tag_for_step(step)
    problem = None
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # an interrupted save's leftovers
        root.mkdir(parents=True, exist_ok=True)
        problem = _space_problem(root, tag)
        if problem is None:
            staging.mkdir(parents=True)
    problem = _all_gather(problem, world_size)[0]
    if problem:
        raise L3TrainError(problem)
    failure = None
    try:
        save_engine_checkpoint(engine, str(staging), tag, {"step": step})
        for part in parts.rank_local:
            part.save(staging / tag, rank)
        if rank == 0:
            (staging / tag / "config.yaml").write_text(cfg.to_yaml())
    except (OSError, RuntimeError) as err:  # torch reports a full disk as "unexpected pos ..."
        failure = f"rank {rank}: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    failures = [f for f in _all_gather(failure, world_size) if f]
    if failures:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise L3TrainError(f"saving checkpoint {tag} failed ({failures[0]}); removed {staging}, "
                           f"{_megabytes(_free_bytes(root))} free on the filesystem of {root}; {_intact(root)}; "
                           f"free space, then continue with --resume")
    files = _checksum_shares(staging / tag, rank, world_size)
    final = root / tag
    if rank == 0:
        config_hash = hashlib.sha256((staging / tag / "config.yaml").read_bytes()).hexdigest()[:16]
        write_manifest(staging / tag, {"kind": "training", "step": step, "tag": tag, "config_hash": config_hash,
                                       **identity}, files)
        _sync_tree(staging / tag)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging / tag, final)
        sync_directory(root)
        atomic_write_text(root / "latest", tag + "\n")
        shutil.rmtree(staging, ignore_errors=True)
        _prune(root, cfg.checkpoint.keep_last, keep=tag)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """Keep the newest `keep_last` complete checkpoints (manifest present, file sizes as
    recorded) and the one just written (`keep`); delete every other one. The newest complete
    checkpoint is therefore never deleted, and an incomplete one never counts as kept."""
    if keep_last <= 0:
        return
    tags = list_tags(root)
    complete = [tag for tag in tags if verify(root / tag, full=False) is None]
    kept = set(complete[-keep_last:]) | {keep}
    for tag in tags:
        if tag not in kept:
            shutil.rmtree(root / tag, ignore_errors=True)


def verify_on_ranks(directory: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """The first problem with checkpoint `directory` (None if it verifies), the files'
    checksums split over the ranks; collective when world_size > 1."""
    problem = verify(directory, rank, world_size)
    if world_size == 1:
        return problem
    return next((p for p in _all_gather(problem, world_size) if p), None)


def _refuse_corrupt(root: Path, tag: str, problem: str, rank: int, world_size: int) -> None:
    older = [t for t in reversed(list_tags(root)) if t < tag]
    good = next((t for t in older if verify_on_ranks(root / t, rank, world_size) is None), None)
    fix = (f"the newest older checkpoint that verifies is {good}: resume from it with "
           f"`echo {good} > {root / 'latest'}`" if good else "no older checkpoint verifies; start a new run_dir")
    raise L3TrainError(f"checkpoint {root / tag} does not verify: {problem}; {fix}")


def _check_identity(saved: dict[str, Any], current: dict[str, Any], directory: Path) -> None:
    """The world layout, allocation and shard ownership the checkpoint was written for."""
    was, now = saved["world"], current["world"]
    prefix = f"cannot resume {directory}"
    hint = "(or move the checkpoint to this layout with tools/convert_checkpoint.py reshard)"
    if was["rows_sharded"] != now["rows_sharded"] or (now["rows_sharded"] and was["world_size"] != now["world_size"]):
        have = f"sharded over {was['world_size']} ranks (TP×DP)" if was["rows_sharded"] else "not sharded"
        want = f"{now['world_size']} (TP×DP)" if now["rows_sharded"] else "none (one shard)"
        raise L3TrainError(f"{prefix}: its L³ rows are {have}, this run's shards are {want}; "
                           f"resume with the same TP×DP {hint}")
    if was["experts_split"] != now["experts_split"] or (now["experts_split"] and (
            was["world_size"], was["expert_parallel"]) != (now["world_size"], now["expert_parallel"])):
        raise L3TrainError(f"{prefix}: its experts were split with moe.expert_parallel={was['expert_parallel']} "
                           f"over {was['world_size']} ranks, this run has {now['expert_parallel']} over "
                           f"{now['world_size']}; resume with the same ranks {hint}")
    if was["zero_stage"] != now["zero_stage"]:
        raise L3TrainError(f"{prefix}: it was written by DeepSpeed at ZeRO-{was['zero_stage']}, this run runs "
                           f"ZeRO-{now['zero_stage']} (fp32 with one data-parallel rank runs ZeRO-0); resume "
                           f"with the same ranks and parallel.zero_stage {hint}")
    if now["zero_stage"] > 0 and was["data_parallel"] != now["data_parallel"]:
        raise L3TrainError(f"{prefix}: its ZeRO-{now['zero_stage']} optimizer state is partitioned over "
                           f"{was['data_parallel']} data-parallel ranks, this run has {now['data_parallel']}; "
                           f"resume with the same ranks {hint}")
    for key, what in (("allocation_hash", "L³ allocation"), ("shard_ownership_hash", "shard plan (token ownership)")):
        if saved.get(key) != current[key]:
            raise L3TrainError(f"{prefix}: it was written with {what} {saved.get(key)}, this run's is "
                               f"{current[key]}; resume with the run's original allocation and ranks")


class Resumed(NamedTuple):
    step: int
    directory: Path
    config_changes: list[str]  # "key: old -> new" for each trajectory key changed on purpose


def load_latest_checkpoint(engine, cfg: Config, identity: dict[str, Any], parts: ParallelModel, rank: int = 0,
                           world_size: int = 1, allow_config_change: bool = False) -> Resumed | None:
    """Verify and load the newest checkpoint of `cfg.run_dir` into `engine` and this rank's
    rank-local tensors; None if there is none. Every check runs before anything is loaded."""
    root = checkpoint_root(cfg.run_dir)
    tag = latest_tag(root)
    if tag is None:
        return None
    directory = root / tag
    problem = verify_on_ranks(directory, rank, world_size)
    if problem:
        _refuse_corrupt(root, tag, problem, rank, world_size)
    manifest, _ = read_manifest(directory)
    saved_config = yaml.safe_load((directory / "config.yaml").read_text())
    changes = check_config_change(saved_config, cfg.to_dict(), str(directory), allow_config_change)
    _check_identity(manifest, identity, directory)
    try:
        client_state = load_engine_checkpoint(engine, str(root), tag)
    except (OSError, RuntimeError, KeyError, EOFError, ValueError) as err:
        raise L3TrainError(f"checkpoint {directory} is unreadable ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); delete it or point "
                           f"{root / 'latest'} at an older one") from None
    if client_state is None or client_state.get("step") != manifest["step"]:
        raise L3TrainError(f"checkpoint {directory} could not be loaded; delete it or point "
                           f"{root / 'latest'} at an older one")
    for part in parts.rank_local:
        part.load(directory, rank)
    return Resumed(manifest["step"], directory, changes)


def refuse_existing_checkpoints(cfg: Config) -> None:
    """A fresh (non --resume) run must not mix its checkpoints and logs with an older run's."""
    tags = list_tags(checkpoint_root(cfg.run_dir))
    if tags:
        raise L3TrainError(f"run_dir {cfg.run_dir} already holds checkpoints (newest {tags[-1]}); "
                           f"pass --resume to continue that run, or choose another run_dir")
