"""Describe a checkpoint without loading a model: what it is, what it holds, whether it verifies.

`describe_checkpoint(path)` accepts a run_dir (its `latest` checkpoint), a `checkpoints/`
directory, one `checkpoints/step_*` training checkpoint, or a consolidated checkpoint, and
returns a `CheckpointReport`: the kind, step, tokens seen, the world layout it was written
with, the model its config describes and its exact parameter count
(l3train.sizing.accounting), statistics of its L³ allocation, optionally every tensor's
name, shape and dtype, and the manifest's verdict. `format_report` renders it as text;
`CheckpointReport.to_dict` as JSON-ready data (tools/inspect_checkpoint.py).

Nothing heavy is read: safetensors tensors are listed from the file headers, DeepSpeed and
rank-local files are memory-mapped (`torch.load(mmap=True)`), so only the pickled metadata
is touched. A missing allocation file or an unreadable config does not stop the report: it
is said in one line, and what depends on it is left out.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from l3train.allocation.allocation import Allocation
from l3train.checkpoint.consolidated import ALLOCATION_FILE, CONFIG_FILE, KIND as CONSOLIDATED, TOKENIZER_FILE
from l3train.checkpoint.manifest import MANIFEST, read_manifest, verify as verify_manifest
from l3train.checkpoint.store import checkpoint_root, latest_tag
from l3train.config import Config, config_from_dict
from l3train.errors import L3TrainError
from l3train.parallel.shard_plan import allocation_hash
from l3train.sizing.accounting import model_stats

TRAINING = "training"
_ACCEPTED = "pass a run_dir, a checkpoints/step_* directory or a consolidated checkpoint"
_TAG = re.compile(r"step_(\d+)")


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # as the file's format names it: "float32" (torch), "F32" (safetensors)
    partitioned: bool = False  # ZeRO-3: the shape is the full parameter's, the file holds a placeholder


@dataclass
class TensorFile:
    """The tensors of one file of the checkpoint, or why they could not be read."""

    file: str  # relative to the checkpoint directory
    tensors: list[TensorInfo]
    problem: str | None = None


@dataclass
class AllocationStats:
    path: str
    vocab_size: int
    budget_v: int  # total rows per L³ layer
    cap_k: int  # the most rows a token may have
    min_rows: int
    mean_rows: float
    median_rows: float
    max_rows: int
    mean_rows_per_occurrence: float  # the mean d_t a corpus token sees (sets the layer's cost)
    mode: str
    hash: str
    checkpoint_hash: str | None  # the allocation hash the checkpoint records, if any


@dataclass
class ModelSummary:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    l3_after_blocks: list[int]
    l3_d_emb: int
    l3_d_up: int
    moe_blocks: list[int]
    moe_num_experts: int
    moe_top_k: int
    total_params: int | None  # None when the model has L³ layers and the allocation (v) is unknown


@dataclass
class ManifestCheck:
    status: Literal["ok", "failed", "skipped"]
    problem: str | None
    files: int
    bytes: int


@dataclass
class CheckpointReport:
    directory: str
    kind: str  # "training" or "consolidated"
    step: int | None
    tokens_seen: int | None  # step × global batch × sequence length of its config
    layout: dict[str, Any] | None  # the manifest's "world" (consolidated: its source's)
    source: dict[str, Any] | None  # consolidated: where it came from, besides the layout
    precision: str | None
    model: ModelSummary | None
    config_problem: str | None  # why the config (and all that depends on it) is missing
    allocation: AllocationStats | None
    allocation_problem: str | None
    tensor_files: list[TensorFile] | None  # None unless asked for
    manifest: ManifestCheck

    @property
    def ok(self) -> bool:
        """False when the manifest check found a problem."""
        return self.manifest.status != "failed"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory `path` names: itself, or the `latest` one of a run_dir or of
    its `checkpoints/` directory; L3TrainError when it is none of these."""
    path = Path(path)
    if not path.exists():
        raise L3TrainError(f"{path} not found; {_ACCEPTED}")
    if not path.is_dir():
        raise L3TrainError(f"{path} is not a directory; {_ACCEPTED}")
    root = path if (path / "latest").is_file() else checkpoint_root(path)
    if root.is_dir():
        tag = latest_tag(root)
        if tag is None:
            raise L3TrainError(f"{root} has no `latest` checkpoint (no checkpoint was completed); "
                               f"pass one of its step_* directories instead")
        return root / tag
    # A directory without a manifest still counts when it holds model files: an incomplete
    # checkpoint, which the report then shows failing verification.
    if not (path / MANIFEST).is_file() and not any(path.glob("*model_states.pt")) and not any(
            path.glob("*.safetensors")):
        raise L3TrainError(f"{path} is not a checkpoint (it has no {MANIFEST}, model files or checkpoints/ "
                           f"directory); {_ACCEPTED}")
    return path


def _read_config(directory: Path, kind: str) -> tuple[Config | None, str | None]:
    """(config, None) or (None, why it cannot be read)."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        return None, f"{path} is unreadable ({type(err).__name__})"
    if kind == CONSOLIDATED and isinstance(tree, dict):
        # A consolidated checkpoint names its own copies of these files, relative to itself.
        for section, key, name in (("data", "tokenizer", TOKENIZER_FILE), ("l3", "allocation", ALLOCATION_FILE)):
            if tree.get(section, {}).get(key) == name:
                tree[section][key] = str(directory / name)
    try:
        return config_from_dict(tree), None
    except L3TrainError as err:
        return None, f"{path} is not a valid config for this l3train: {err}"


def _allocation_stats(cfg: Config, recorded_hash: str | None) -> tuple[AllocationStats | None, str | None]:
    """Statistics of the config's allocation, or (None, why there are none)."""
    path = cfg.l3.allocation
    if not Path(path).is_file():
        return None, f"l3.allocation {path} is not on this machine: no allocation statistics"
    try:
        allocation = Allocation.load(path, expect_vocab_size=cfg.model.vocab_size)
    except L3TrainError as err:
        return None, str(err)
    rows = allocation.rows_per_token
    return AllocationStats(
        path=str(path), vocab_size=allocation.vocab_size, budget_v=allocation.budget_v, cap_k=allocation.cap_k,
        min_rows=int(rows.min()), mean_rows=float(rows.mean()), median_rows=float(np.median(rows)),
        max_rows=int(rows.max()), mean_rows_per_occurrence=allocation.mean_rows_per_token_occurrence(),
        mode=allocation.mode, hash=allocation_hash(rows), checkpoint_hash=recorded_hash), None


def _model_summary(cfg: Config, allocation: AllocationStats | None) -> ModelSummary:
    m, l3, moe = cfg.model, cfg.l3, cfg.moe
    total = None
    if not l3.after_blocks or allocation is not None:
        rows = allocation.budget_v if allocation else 0
        total = model_stats(m, l3, cfg.data.seq_length, rows, moe=moe).total_params
    return ModelSummary(vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                        n_kv_heads=m.n_kv_heads, l3_after_blocks=list(l3.after_blocks), l3_d_emb=l3.d_emb,
                        l3_d_up=l3.d_up, moe_blocks=list(moe.blocks), moe_num_experts=moe.num_experts,
                        moe_top_k=moe.top_k, total_params=total)


def _safetensors_files(directory: Path) -> list[TensorFile]:
    """Every tensor of the checkpoint's safetensors files, from their headers only."""
    from safetensors import SafetensorError, safe_open

    listed = []
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                slices = {name: handle.get_slice(name) for name in handle.keys()}
                tensors = [TensorInfo(name, tuple(piece.get_shape()), piece.get_dtype())
                           for name, piece in slices.items()]
            listed.append(TensorFile(path.name, tensors))
        except (OSError, SafetensorError) as err:
            listed.append(TensorFile(path.name, [], f"unreadable ({type(err).__name__}: {err})"))
    return listed


def _torch_tensors(state: dict[str, Any]) -> list[TensorInfo]:
    """The tensors of a DeepSpeed model-states file (its `module`) or of a rank-local file
    (its `tensors` list, which has no names: they are listed by position)."""
    import torch

    if "module" not in state:
        return [TensorInfo(f"tensors[{i}]", tuple(t.shape), str(t.dtype).removeprefix("torch."))
                for i, t in enumerate(state["tensors"])]
    # ZeRO-3 leaves an empty placeholder per partitioned parameter; `param_shapes` (one dict
    # per parameter group) has the full shapes.
    full_shapes = {name: shape for group in state.get("param_shapes") or [] for name, shape in group.items()}
    listed = []
    for name, tensor in state["module"].items():
        if not torch.is_tensor(tensor):  # megatron's `_extra_state` entries (None)
            continue
        partitioned = tensor.numel() == 0 and name in full_shapes
        shape = full_shapes[name] if partitioned else tensor.shape
        listed.append(TensorInfo(name, tuple(shape), str(tensor.dtype).removeprefix("torch."), partitioned))
    return listed


def _training_files(directory: Path) -> list[TensorFile]:
    """The model tensors of every TP rank (ZeRO-3: from data-parallel rank 0's model states,
    which name the same parameters as every other) and of every rank-local file."""
    import torch

    model_states = sorted(directory.glob("mp_rank_*_model_states.pt")) or sorted(
        directory.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))
    # l3train.parallel.sharded_optim.rank_file names them
    rank_local = sorted(path for kind in ("l3_rows", "experts") for path in directory.glob(f"{kind}_rank*.pt"))
    listed = []
    for path in [*model_states, *rank_local]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            listed.append(TensorFile(path.name, _torch_tensors(state)))
        except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
            # A corrupted file fails in many ways; the manifest check names the corruption.
            message = str(err).splitlines()[0] if str(err) else ""
            listed.append(TensorFile(path.name, [], f"unreadable ({type(err).__name__}: {message})"))
    return listed


def _check_manifest(directory: Path, manifest: dict[str, Any] | None, manifest_problem: str | None,
                    verify: bool) -> ManifestCheck:
    if manifest is None:
        return ManifestCheck("failed", manifest_problem, 0, 0)
    files, size = len(manifest["files"]), sum(entry["size"] for entry in manifest["files"].values())
    if not verify:
        return ManifestCheck("skipped", None, files, size)
    problem = verify_manifest(directory)
    return ManifestCheck("failed" if problem else "ok", problem, files, size)


def describe_checkpoint(path: str | Path, verify: bool = True, tensors: bool = False) -> CheckpointReport:
    """Describe the checkpoint `path` names (see `resolve_checkpoint`); with `verify`, check
    every file's size and CRC-32 against the manifest; with `tensors`, list every tensor."""
    directory = resolve_checkpoint(path)
    manifest, manifest_problem = read_manifest(directory)
    if manifest is not None:
        kind = manifest.get("kind", TRAINING)
    else:  # an incomplete checkpoint: judge by its files
        kind = CONSOLIDATED if any(directory.glob("*.safetensors")) else TRAINING
    step = manifest.get("step") if manifest else None
    if step is None and (match := _TAG.fullmatch(directory.name)):
        step = int(match.group(1))

    layout = source = recorded_hash = None
    if manifest is not None and kind == CONSOLIDATED:
        # The training checkpoint it was consolidated from recorded the layout and allocation.
        source = dict(manifest.get("source") or {})
        layout, recorded_hash = source.pop("world", None), source.get("allocation_hash")
    elif manifest is not None:
        layout, recorded_hash = manifest.get("world"), manifest.get("allocation_hash")

    cfg, config_problem = _read_config(directory, kind)
    allocation = allocation_problem = None
    if cfg is not None and cfg.l3.after_blocks:
        allocation, allocation_problem = _allocation_stats(cfg, recorded_hash)
    tokens = None
    if cfg is not None and step is not None:
        tokens = step * cfg.training.global_batch_size * cfg.data.seq_length

    tensor_files = None
    if tensors:
        tensor_files = _safetensors_files(directory) if kind == CONSOLIDATED else _training_files(directory)
    return CheckpointReport(
        directory=str(directory), kind=kind, step=step, tokens_seen=tokens, layout=layout, source=source or None,
        precision=cfg.training.precision if cfg else None,
        model=_model_summary(cfg, allocation) if cfg else None, config_problem=config_problem,
        allocation=allocation, allocation_problem=allocation_problem, tensor_files=tensor_files,
        manifest=_check_manifest(directory, manifest, manifest_problem, verify))


def _format_layout(layout: dict[str, Any]) -> str:
    world, tp, dp, ep = (layout.get(key) for key in ("world_size", "tensor_parallel", "data_parallel",
                                                      "expert_parallel"))
    rows = f"L³ rows sharded over {world} ranks" if layout.get("rows_sharded") else "L³ rows not sharded"
    experts = f"experts split over {ep} ranks (EP)" if layout.get("experts_split") else "experts not split"
    return (f"{world} rank(s) (TP {tp} × DP {dp}, EP {ep}), ZeRO-{layout.get('zero_stage')}, "
            f"{rows}, {experts}")


def _format_model(model: ModelSummary) -> list[str]:
    l3 = (f"L³ after blocks {model.l3_after_blocks} (d_emb {model.l3_d_emb}, d_up {model.l3_d_up})"
          if model.l3_after_blocks else "no L³ layers")
    moe = (f"MoE in blocks {model.moe_blocks} ({model.moe_num_experts} experts, top-{model.moe_top_k})"
           if model.moe_blocks else "no MoE blocks")
    params = (f"{model.total_params:,} ({model.total_params / 1e6:.2f}M)" if model.total_params is not None
              else "unknown (the L³ tables' size needs the allocation)")
    return [f"model: vocab {model.vocab_size:,}, d_model {model.d_model}, {model.n_layers} layers, "
            f"{model.n_heads} heads ({model.n_kv_heads} KV), {l3}, {moe}",
            f"parameters: {params}"]


def _format_allocation(stats: AllocationStats) -> list[str]:
    if stats.checkpoint_hash is None:
        identity = ""
    elif stats.checkpoint_hash == stats.hash:
        identity = " (as the checkpoint records)"
    else:
        identity = (f" (the checkpoint records {stats.checkpoint_hash}: this file is not the allocation "
                    f"it was trained with)")
    return [f"allocation {stats.path}: mode {stats.mode}, hash {stats.hash}{identity}",
            f"  vocab {stats.vocab_size:,}, v {stats.budget_v:,} rows, k {stats.cap_k} (cap); rows per token "
            f"min {stats.min_rows}, mean {stats.mean_rows:.2f}, median {stats.median_rows:g}, max {stats.max_rows}, "
            f"mean per token occurrence {stats.mean_rows_per_occurrence:.2f}"]


def _format_tensors(files: list[TensorFile]) -> list[str]:
    lines = ["tensors:"]
    for entry in files:
        lines.append(f"  {entry.file}" + (f": {entry.problem}" if entry.problem else f" ({len(entry.tensors)})"))
        shapes = [str(list(t.shape)) for t in entry.tensors]
        name_width = max((len(t.name) for t in entry.tensors), default=0)
        shape_width = max(map(len, shapes), default=0)
        dtype_width = max((len(t.dtype) for t in entry.tensors), default=0)
        for tensor, shape in zip(entry.tensors, shapes):
            note = "ZeRO-3 partitioned (full shape)" if tensor.partitioned else ""
            row = f"    {tensor.name:<{name_width}}  {shape:<{shape_width}}  {tensor.dtype:<{dtype_width}}  {note}"
            lines.append(row.rstrip())
    return lines


def format_report(report: CheckpointReport) -> str:
    """The report as text, one fact per line; the manifest's verdict last but the tensors."""
    step = "unknown" if report.step is None else f"{report.step:,}"
    lines = [f"checkpoint {report.directory} ({report.kind})"]
    tokens = "" if report.tokens_seen is None else f", tokens seen {report.tokens_seen:,}"
    lines.append(f"step {step}{tokens}")
    label = "trained in layout" if report.kind == "consolidated" else "layout"
    lines.append(f"{label}: {_format_layout(report.layout)}" if report.layout else f"{label}: not recorded")
    if report.source:
        lines.append("source: " + ", ".join(f"{key} {value}" for key, value in report.source.items()))
    if report.config_problem:
        lines.append(f"config: {report.config_problem}")
    if report.precision:
        lines.append(f"precision: {report.precision}")
    if report.model:
        lines += _format_model(report.model)
    if report.allocation:
        lines += _format_allocation(report.allocation)
    elif report.allocation_problem:
        lines.append(f"allocation: {report.allocation_problem}")
    check = report.manifest
    size = f"{check.files} files, {check.bytes / 1e6:.1f} MB"
    if check.status == "ok":
        lines.append(f"manifest: OK ({size})")
    elif check.status == "skipped":
        lines.append(f"manifest: not verified (--no-verify; {size})")
    else:
        lines.append(f"manifest: FAILED: {check.problem}")
    if report.tensor_files is not None:
        lines += _format_tensors(report.tensor_files)
    return "\n".join(lines)
