"""DeepSpeed's checkpoint files: written and read through a live engine (`save_engine_checkpoint`,
`load_engine_checkpoint`), and read without one (`read_weights`, `read_zero_moments`,
`read_zero0_moments`: the fp32 weights and AdamW moments of a TP rank, merged over the ZeRO
partitions with DeepSpeed's zero_to_fp32). The trainer's DeepSpeed adapter keeps only what
touches a running engine; every format on disk is l3train.checkpoint's.

Reading without an engine (checkpoint conversion) uses DeepSpeed's internals: the weights
come from DeepSpeed's own reader, `deepspeed.utils.zero_to_fp32`, which knows every stage's
partitioning but assumes data parallelism only, so it is given a view of one TP rank's
files at a time (symbolic links renamed to mp rank 00); the AdamW moments sit in the same
flat partitions as the fp32 weights, so they are un-flattened by that reader's private
merge functions (`_get_fp32_state_dict_from_zero{2,3}_checkpoint`), given the moment
partitions in place of the weight partitions. DeepSpeed's files per TP rank t: ZeRO 0
`mp_rank_{t:02d}_model_states.pt` (`module`, and `optimizer`: the client optimizer's
state by parameter position); ZeRO 1/2 the same plus `zero_pp_rank_{d}_mp_rank_{t:02d}_
optim_states.pt` per DP rank d; ZeRO 3 `zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt`
and `..._optim_states.pt` per d. tests/integration/test_convert_checkpoint.py checks the
result against DeepSpeed's `zero_to_fp32` at every stage.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from l3train.checkpoint.consolidated import MOMENTS
from l3train.errors import L3TrainError


def load_engine_checkpoint(engine, root: str, tag: str) -> dict | None:
    """Load DeepSpeed's part of checkpoint `root/tag`; its client state, None if it found nothing."""
    path, client_state = engine.load_checkpoint(root, tag=tag)
    return None if path is None else client_state


def save_engine_checkpoint(engine, root: str, tag: str, client_state: dict) -> None:
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)


_VIEW_TAG = "tp_rank_view"


@contextlib.contextmanager
def _tp_rank_view(directory: Path, tp_rank: int) -> Iterator[Path]:
    """A temporary checkpoint root whose tag `_VIEW_TAG` holds links to TP rank `tp_rank`'s
    DeepSpeed files, renamed as mp rank 00, as `zero_to_fp32` expects."""
    marker = f"mp_rank_{tp_rank:02d}_"
    with tempfile.TemporaryDirectory(prefix="l3train-tp-view-") as root:
        view = Path(root) / _VIEW_TAG
        view.mkdir()
        for path in sorted(directory.glob(f"*{marker}*.pt")):
            (view / path.name.replace(marker, "mp_rank_00_")).symlink_to(path.resolve())
        yield Path(root)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """zero_to_fp32 prints progress lines and bars; the converter has its own."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def read_weights(directory: Path, tp_rank: int, zero_stage: int) -> dict[str, Tensor]:
    """The fp32 weights and buffers held by DeepSpeed for TP rank `tp_rank`, by name (this TP
    rank's slice of split tensors). Values may be lazy: call `.contiguous()` on each."""
    if zero_stage == 0:
        state = torch.load(directory / f"mp_rank_{tp_rank:02d}_model_states.pt", map_location="cpu",
                           weights_only=False, mmap=True)
        return {name: tensor for name, tensor in state["module"].items() if tensor is not None}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _tp_rank_view(directory, tp_rank) as root, _quiet():
        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=_VIEW_TAG, lazy_mode=True)


def _optimizer_step(states: list[dict]) -> float:
    """The one step count of the optimizer's states; 0 when it has not stepped (no state)."""
    steps = {float(state["step"]) for state in states if "step" in state}
    if not steps:
        return 0.0
    if len(steps) != 1:
        raise L3TrainError(f"the optimizer state records step counts {sorted(steps)}; expected one")
    return steps.pop()


def read_zero0_moments(directory: Path, tp_rank: int, names: list[str]) -> tuple[dict[str, dict[str, Tensor]], float]:
    """AdamW's moments at ZeRO 0, by name; `names` are the engine's parameters in the order
    of the optimizer's groups (the client optimizer's state is keyed by that position)."""
    state = torch.load(directory / f"mp_rank_{tp_rank:02d}_model_states.pt", map_location="cpu",
                       weights_only=False, mmap=True)["optimizer"]
    indices = [index for group in state["param_groups"] for index in group["params"]]
    if len(indices) != len(names):
        raise L3TrainError(f"{directory}: the optimizer holds {len(indices)} tensors, the model has {len(names)} "
                           f"outside the rank-local ones; the checkpoint does not match its config")
    per_param = [state["state"].get(index, {}) for index in indices]
    moments = {key: {name: entry[key] for name, entry in zip(names, per_param) if key in entry} for key in MOMENTS}
    return moments, _optimizer_step(per_param)


def read_zero_moments(directory: Path, tp_rank: int) -> tuple[dict[str, dict[str, Tensor]], float]:
    """AdamW's moments at ZeRO 1-3 for TP rank `tp_rank`, by name, merged over the DP partitions."""
    from deepspeed.utils import zero_to_fp32 as reader

    with _tp_rank_view(directory, tp_rank) as root, _quiet():
        view = root / _VIEW_TAG
        model_states = reader.parse_model_states(reader.get_model_state_files(str(view)))
        optim_files = reader.get_optim_files(str(view))
        partitions = [torch.load(path, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
                      for path in optim_files]
        stage = partitions[0]["zero_stage"]
        world_size = len(partitions)
        base_key = "base_optimizer_state" if stage <= 2 else "optimizer_state_dict"
        group_states = [[part[base_key]["state"][index] for index in sorted(part[base_key]["state"])]
                        for part in partitions]
        step = _optimizer_step([state for states in group_states for state in states])
        moments = {key: {} for key in MOMENTS}
        if step == 0:
            return moments, step
        for key in MOMENTS:
            flat_groups = [[state[key] for state in states] for states in group_states]
            if stage <= 2:
                merged = reader._get_fp32_state_dict_from_zero2_checkpoint(
                    world_size, flat_groups, model_states, False, partitions[0].get("param_alignment_paddings"))
            else:
                merged = reader._get_fp32_state_dict_from_zero3_checkpoint(world_size, flat_groups, model_states,
                                                                           False)
            buffers = model_states[0].buffers
            moments[key] = {name: tensor.contiguous() for name, tensor in merged.items() if name not in buffers}
    return moments, step
