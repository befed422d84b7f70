"""Which config keys may change when a run is resumed.

Three kinds of key:
- **fixed**: the shapes or meaning of the saved tensors, or how they are split over ranks
  (model architecture, L³ and MoE layout, TP size, ZeRO stage, row sharding). Changing one
  would load a different model; it is always refused.
- **trajectory**: keys that change the steps still to come (seed, batch sizes, data blend,
  learning-rate schedule, loss weights, numerics). Refused unless `--allow-config-change`,
  which logs every changed key; the new values then apply from the resumed step on.
- **free**: keys that change nothing the model sees (where and how often to log, validate
  and save; the allocation's file path, whose content is checked by hash).
Every key not listed as fixed or free is a trajectory key, so a new config key is guarded
until someone decides otherwise.
"""

from __future__ import annotations

from typing import Any

from l3train.errors import L3TrainError

_FIXED_SECTIONS = ("model", "l3", "moe")
_NOT_FIXED = {"l3.allocation", "l3.lr", "l3.weight_decay", "moe.aux_loss_weight", "moe.z_loss_weight",
              "moe.capacity_factor"}
_FIXED_KEYS = {"parallel.tensor_parallel", "parallel.zero_stage", "parallel.shard_l3_rows"}
FREE_KEYS = {"run_dir", "l3.allocation", "training.eval_interval", "training.eval_batches",
             "training.log_interval", "training.max_skipped_steps", "training.profile_steps", "training.recompute",
             "checkpoint.save_interval", "checkpoint.keep_last", "parallel.collective_timeout_minutes",
             "parallel.shared_memory_exchange",
             "training.peak_tflops", "logging.wandb", "logging.wandb_project", "logging.wandb_entity",
             "logging.wandb_name", "logging.wandb_mode"}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


def is_fixed(key: str) -> bool:
    return key in _FIXED_KEYS or (key.split(".")[0] in _FIXED_SECTIONS and key not in _NOT_FIXED)


def changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, current value)} for every key that differs."""
    old, new = _flatten(saved), _flatten(current)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)}


def check_config_change(saved: dict[str, Any], current: dict[str, Any], source: str,
                        allow_trajectory_change: bool) -> list[str]:
    """Refuse a resume whose config differs from the checkpoint's (`saved`) in a fixed key, or
    in a trajectory key unless `allow_trajectory_change`; returns one line per accepted
    trajectory change, for the log."""
    changes = changed_keys(saved, current)
    fixed = [f"{key}={old!r} but the config has {new!r}" for key, (old, new) in changes.items() if is_fixed(key)]
    if fixed:
        raise L3TrainError(f"cannot resume {source}: it was written with {'; '.join(fixed)} (such keys fix the "
                           f"model's tensors or their split over ranks); use the checkpoint's values, a new run_dir, or "
                           f"tools/convert_checkpoint.py reshard for another layout")
    describe = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()]
    trajectory = [line for line, key in zip(describe, changes) if key not in FREE_KEYS]
    if trajectory and not allow_trajectory_change:
        raise L3TrainError(f"cannot resume {source} unchanged: {'; '.join(trajectory)} would change the training "
                           f"trajectory; restore the saved values, or pass --allow-config-change to continue "
                           f"with the new ones")
    return trajectory
