"""The one configuration schema: dataclasses loaded from YAML, validated at load.

A run is described by a YAML file in `configs/` plus `key.sub=value` overrides from the
command line (values are parsed as YAML, so `l3.after_blocks=[1,3]` works). Loading
rejects unknown keys, wrong types, values outside a closed set of choices (`Literal`
fields) and inconsistent sizes with one message naming the key. The resolved config is
written next to every checkpoint so a run can be rebuilt.

All checks live here: those that need only the config run at load (`_validate`); those
that depend on the number of ranks run in `validate_for_world`, which also derives how a
rank splits its share of the global batch into micro-batches.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from l3train.errors import L3TrainError


# Elements of DeepSpeed's gradient reduction buckets: ZeRO's `reduce_bucket_size` (set by
# l3train.trainer.deepspeed_adapter.engine_config, DeepSpeed's default) and the engine's own
# all-reduce bucket at ZeRO-0. Each is a flat buffer of this many gradient elements
# (l3train.sizing.memory counts it in a rank's memory).
GRADIENT_BUCKET_ELEMENTS = 500_000_000


@dataclass
class ModelConfig:
    """Llama-style decoder backbone."""

    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4  # < n_heads gives grouped-query attention
    ffn_hidden_size: int = 352  # SwiGLU inner size
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02


@dataclass
class L3Config:
    """Large Lookup Layers inserted between decoder blocks."""

    after_blocks: list[int] = field(default_factory=list)  # 0-based block indices; [] = dense model
    d_emb: int = 128  # value width; must equal model.d_model when tied_kv
    d_up: int = 512
    tied_kv: bool = True
    norm: Literal["rms", "layer"] = "rms"
    allocation: str = ""  # .npz written by tools/lzw_allocate.py
    lr: float | None = None  # learning rate of the L³ rows (None: optimizer.lr)
    weight_decay: float = 0.0  # weight decay of the L³ rows


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forwards: the iso-sparse baseline, and combinable with L³."""

    blocks: list[int] = field(default_factory=list)  # 0-based blocks whose SwiGLU becomes experts; [] = none
    num_experts: int = 8
    top_k: int = 2
    expert_hidden_size: int = 176  # SwiGLU inner size of each expert
    aux_loss_weight: float = 1e-2  # load-balancing loss (Switch Transformer), per MoE layer
    z_loss_weight: float = 1e-3  # router z-loss (ST-MoE), per MoE layer
    # None: dropless. Else each expert takes at most ceil(factor · tokens · top_k / num_experts)
    # of a rank's micro-batch; the lowest-probability assignments over that are dropped.
    capacity_factor: float | None = None
    # Experts partitioned over groups of this many data-parallel ranks (all-to-all dispatch);
    # 1 replicates them on every rank.
    expert_parallel: int = 1


@dataclass
class DataConfig:
    """Megatron indexed datasets (.bin/.idx) and the tokenizer that wrote them."""

    prefixes: list[str] = field(default_factory=list)
    weights: list[float] | None = None  # blend weights, one per prefix (None: equal)
    split: str = "98,2,0"  # train,valid,test proportions
    seq_length: int = 128
    tokenizer: str = ""  # sentencepiece .model


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay to `min_lr`."""

    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables it
    warmup_steps: int = 20


@dataclass
class TrainingConfig:
    steps: int = 200
    # Sequences per rank per forward pass, at most: with many ranks a rank's share of the
    # global batch may be smaller, and then is one micro-batch (see `validate_for_world`).
    micro_batch_size: int = 8
    global_batch_size: int = 16  # sequences per optimizer step over all ranks
    seed: int = 1234
    precision: Literal["fp32", "bf16"] = "fp32"
    # Recompute activations in backward instead of storing them: none, every decoder and L³
    # block ("blocks"), or the L³ blocks only ("l3"); see l3train/parallel/recompute.py.
    recompute: Literal["none", "blocks", "l3"] = "none"
    eval_interval: int = 50
    eval_batches: int = 4
    log_interval: int = 10
    # A step whose loss or gradient is not finite is skipped (no update anywhere); this many
    # in a row stop the run.
    max_skipped_steps: int = 10
    # [first, last): profile these steps (torch.profiler): a Chrome trace per rank and the
    # time per phase (data, forward, backward, optimizer, all_to_all) under run_dir/profile/;
    # with several ranks, each collective's transfer and waiting (collectives.md).
    profile_steps: list[int] = field(default_factory=list)
    # The device's peak TFLOP/s, the denominator of the logged MFU (train/mfu). null: from
    # the table of known GPUs in l3train/trainer/throughput.py for training.precision; on
    # a CPU or an unknown GPU no MFU is logged unless this is set.
    peak_tflops: float | None = None


@dataclass
class LoggingConfig:
    """Optional loggers beside the console, TensorBoard and metrics.jsonl (rank 0 only)."""

    # Weights & Biases: the same scalars as TensorBoard (needs `pip install wandb`).
    wandb: bool = False
    wandb_project: str = "l3train"
    wandb_entity: str = ""  # "" : the account's default entity
    wandb_name: str = ""  # "" : the name of run_dir
    # offline writes the run under <run_dir>/wandb (or $WANDB_DIR) for `wandb sync` later.
    wandb_mode: Literal["online", "offline", "disabled"] = "online"


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    # Split the residual stream along the sequence over the TP ranks (megatron's sequence
    # parallelism; l3train.parallel.tensor_parallel): needs tensor_parallel > 1.
    sequence_parallel: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 0  # DeepSpeed ZeRO stage
    # Partition the L³ rows over the TP×DP ranks by the static router (when there are > 1
    # ranks and L³ layers); their optimizer and checkpoints are then outside DeepSpeed.
    shard_l3_rows: bool = True
    # A collective that waits longer than this fails instead of hanging (a rank that froze);
    # a rank that died is noticed at once through its closed connections.
    collective_timeout_minutes: float = 10.0
    # All-to-alls between CPU ranks of one host (sharded L³ rows, expert parallelism) through
    # /dev/shm instead of gloo's TCP (l3train.parallel.shared_memory); false keeps them on gloo.
    shared_memory_exchange: bool = True


@dataclass
class CheckpointConfig:
    save_interval: int = 100  # steps; the final step is always saved
    keep_last: int = 2  # older checkpoints are deleted (0 keeps all)


@dataclass
class Config:
    run_dir: str = "runs/tiny"  # checkpoints, tensorboard/, config.yaml
    model: ModelConfig = field(default_factory=ModelConfig)
    l3: L3Config = field(default_factory=L3Config)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are due."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if not any(value == choice and type(value) is type(choice) for choice in choices):
            raise L3TrainError(f"{key}: must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except L3TrainError:
                pass
        raise L3TrainError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise L3TrainError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        return float(value)  # PyYAML reads "3e-4" (no dot) as a string
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise L3TrainError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, values: Any, prefix: str) -> Any:
    where = prefix or "config"
    if not isinstance(values, dict):
        raise L3TrainError(f"{where}: expected a mapping of keys, got {type(values).__name__} {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise L3TrainError(f"{key}: unknown key; valid keys under {where} are {', '.join(names)}")
    kwargs = {name: _coerce(values[name], hints[name], f"{prefix}.{name}" if prefix else name)
              for name in names if name in values}
    return cls(**kwargs)


def _check_positive(cfg: Config) -> None:
    """Every count and size of the config is >= 1."""
    m, l3, moe, data, tr = cfg.model, cfg.l3, cfg.moe, cfg.data, cfg.training
    positive = {"model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.n_layers": m.n_layers,
                "model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads,
                "model.ffn_hidden_size": m.ffn_hidden_size, "model.max_seq_len": m.max_seq_len,
                "l3.d_emb": l3.d_emb, "l3.d_up": l3.d_up, "data.seq_length": data.seq_length,
                "training.steps": tr.steps, "training.micro_batch_size": tr.micro_batch_size,
                "training.global_batch_size": tr.global_batch_size, "training.eval_interval": tr.eval_interval,
                "training.eval_batches": tr.eval_batches, "training.log_interval": tr.log_interval,
                "training.max_skipped_steps": tr.max_skipped_steps,
                "checkpoint.save_interval": cfg.checkpoint.save_interval,
                "parallel.tensor_parallel": cfg.parallel.tensor_parallel, "moe.num_experts": moe.num_experts,
                "moe.top_k": moe.top_k, "moe.expert_hidden_size": moe.expert_hidden_size,
                "moe.expert_parallel": moe.expert_parallel}
    for key, value in positive.items():
        if value < 1:
            raise L3TrainError(f"{key}: must be >= 1, got {value}")


def _validate(cfg: Config) -> None:
    m, l3, moe, data, opt, tr = cfg.model, cfg.l3, cfg.moe, cfg.data, cfg.optimizer, cfg.training
    _check_positive(cfg)
    checks = [
        (m.d_model % m.n_heads == 0, "model.d_model", f"must be divisible by model.n_heads ({m.n_heads}), got {m.d_model}"),
        ((m.d_model // m.n_heads) % 2 == 0, "model.d_model", "head size d_model/n_heads must be even for RoPE"),
        (m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", f"must divide model.n_heads ({m.n_heads}), got {m.n_kv_heads}"),
        (data.seq_length <= m.max_seq_len, "data.seq_length", f"{data.seq_length} exceeds model.max_seq_len ({m.max_seq_len})"),
        (len(set(l3.after_blocks)) == len(l3.after_blocks), "l3.after_blocks", f"has duplicates: {l3.after_blocks}"),
        (all(0 <= b < m.n_layers for b in l3.after_blocks), "l3.after_blocks",
         f"indices must be in 0..{m.n_layers - 1} (model.n_layers={m.n_layers}), got {l3.after_blocks}"),
        (not l3.after_blocks or not l3.tied_kv or l3.d_emb == m.d_model, "l3.d_emb",
         f"tied keys/values need l3.d_emb == model.d_model ({m.d_model}), got {l3.d_emb}; set l3.tied_kv=false or change l3.d_emb"),
        (len(set(moe.blocks)) == len(moe.blocks), "moe.blocks", f"has duplicates: {moe.blocks}"),
        (all(0 <= b < m.n_layers for b in moe.blocks), "moe.blocks",
         f"indices must be in 0..{m.n_layers - 1} (model.n_layers={m.n_layers}), got {moe.blocks}"),
        (moe.top_k <= moe.num_experts, "moe.top_k", f"must be <= moe.num_experts ({moe.num_experts}), got {moe.top_k}"),
        (moe.aux_loss_weight >= 0 and moe.z_loss_weight >= 0, "moe.aux_loss_weight",
         f"and moe.z_loss_weight must be >= 0, got {moe.aux_loss_weight} and {moe.z_loss_weight}"),
        (moe.capacity_factor is None or moe.capacity_factor > 0, "moe.capacity_factor",
         f"must be > 0, or null for dropless dispatch, got {moe.capacity_factor}"),
        (moe.num_experts % moe.expert_parallel == 0, "moe.expert_parallel",
         f"must divide moe.num_experts ({moe.num_experts}), got {moe.expert_parallel}"),
        (moe.expert_parallel == 1 or cfg.parallel.tensor_parallel == 1, "moe.expert_parallel",
         f"> 1 needs parallel.tensor_parallel=1 (got {cfg.parallel.tensor_parallel}); experts are "
         f"replicated over TP ranks, so use moe.expert_parallel=1 with tensor parallelism"),
        (not cfg.parallel.sequence_parallel or cfg.parallel.tensor_parallel > 1, "parallel.sequence_parallel",
         "needs parallel.tensor_parallel > 1 (it splits the sequence over the TP ranks)"),
        (not cfg.parallel.sequence_parallel or data.seq_length % cfg.parallel.tensor_parallel == 0,
         "parallel.sequence_parallel", f"needs data.seq_length ({data.seq_length}) divisible by "
                                       f"parallel.tensor_parallel ({cfg.parallel.tensor_parallel})"),
        (not cfg.parallel.sequence_parallel or not moe.blocks, "parallel.sequence_parallel",
         "does not support MoE blocks (moe.blocks); turn one of them off"),
        (not l3.after_blocks or l3.allocation, "l3.allocation",
         "is required when l3.after_blocks is set; build one with tools/lzw_allocate.py"),
        (data.weights is None or len(data.weights) == len(data.prefixes), "data.weights",
         f"needs one weight per prefix ({len(data.prefixes)}), got {data.weights}"),
        (tr.global_batch_size % tr.micro_batch_size == 0, "training.global_batch_size",
         f"{tr.global_batch_size} must be a multiple of training.micro_batch_size ({tr.micro_batch_size})"),
        (0 <= opt.min_lr <= opt.lr, "optimizer.min_lr", f"must be in [0, optimizer.lr={opt.lr}], got {opt.min_lr}"),
        (0 <= opt.warmup_steps <= tr.steps, "optimizer.warmup_steps",
         f"must be in [0, training.steps={tr.steps}], got {opt.warmup_steps}"),
        (not tr.profile_steps or (len(tr.profile_steps) == 2
                                  and 0 <= tr.profile_steps[0] < tr.profile_steps[1] <= tr.steps),
         "training.profile_steps", f"must be [] or [first, last) with 0 <= first < last <= training.steps="
                                   f"{tr.steps}, got {tr.profile_steps}"),
        (cfg.parallel.collective_timeout_minutes > 0, "parallel.collective_timeout_minutes",
         f"must be > 0, got {cfg.parallel.collective_timeout_minutes}"),
        (opt.grad_clip >= 0, "optimizer.grad_clip", f"must be >= 0 (0 disables clipping), got {opt.grad_clip}"),
        (cfg.checkpoint.keep_last >= 0, "checkpoint.keep_last", f"must be >= 0, got {cfg.checkpoint.keep_last}"),
        (tr.peak_tflops is None or tr.peak_tflops > 0, "training.peak_tflops",
         f"must be > 0, or null for the table of known GPUs, got {tr.peak_tflops}"),
        (not cfg.logging.wandb or cfg.logging.wandb_project, "logging.wandb_project",
         "must name a project when logging.wandb is true"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise L3TrainError(f"{key}: {message}")
    _validate_tensor_parallel(cfg)


def _validate_tensor_parallel(cfg: Config) -> None:
    """Tensor parallelism splits heads, the SwiGLU and the vocabulary over the TP ranks."""
    tp, m = cfg.parallel.tensor_parallel, cfg.model
    sizes = {"model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads,
             "model.ffn_hidden_size": m.ffn_hidden_size, "model.vocab_size": m.vocab_size}
    for key, size in sizes.items():
        if size % tp:
            raise L3TrainError(f"{key}={size} is not divisible by parallel.tensor_parallel={tp}: "
                               f"tensor parallelism splits it over the ranks")


@dataclass(frozen=True)
class WorldLayout:
    """How a run of `cfg` spreads over `world_size` ranks (derived by `validate_for_world`)."""

    world_size: int
    tensor_parallel: int
    data_parallel: int
    expert_parallel: int
    micro_batch_size: int  # sequences per forward pass on one rank
    gradient_accumulation_steps: int
    rows_sharded: bool  # L³ rows partitioned over the TP×DP ranks
    experts_split: bool  # MoE experts partitioned over the EP groups
    zero_stage: int  # the ZeRO stage DeepSpeed runs (see `effective_zero_stage`)

    @property
    def rank_local_parameters(self) -> bool:
        """Some parameters live outside DeepSpeed, on one rank each."""
        return self.rows_sharded or self.experts_split


def effective_zero_stage(cfg: Config, data_parallel: int) -> int:
    """`parallel.zero_stage`, except 0 for fp32 with one data-parallel rank: ZeRO partitions
    over the data-parallel ranks, so over one it partitions nothing, and its flat buffers,
    copies and checks cost a full pass over every parameter several times a step (the
    L³ tables' millions of rows the most). bf16 keeps its stage: DeepSpeed's ZeRO-0 bf16
    optimizer would accumulate gradients in bf16."""
    if data_parallel == 1 and cfg.training.precision == "fp32":
        return 0
    return cfg.parallel.zero_stage


def validate_for_world(cfg: Config, world_size: int) -> WorldLayout:
    """Every check that depends on the number of ranks, in one line naming what to change;
    returns the layout. The micro-batch is `training.micro_batch_size` unless a rank's share
    of the global batch is smaller: then that share is one micro-batch (so a config runs
    unchanged at 1, 2 or 4 ranks)."""
    tr, tp = cfg.training, cfg.parallel.tensor_parallel
    if world_size % tp:
        raise L3TrainError(f"parallel.tensor_parallel={tp} must divide the number of ranks ({world_size}); "
                           f"launch a multiple of {tp} ranks or change it")
    dp = world_size // tp
    ep = cfg.moe.expert_parallel if cfg.moe.blocks else 1
    if dp % ep:
        raise L3TrainError(f"moe.expert_parallel={ep} must divide the number of data-parallel ranks ({dp}); "
                           f"launch a multiple of {ep * tp} ranks or change it")
    if tr.global_batch_size % dp:
        raise L3TrainError(f"training.global_batch_size={tr.global_batch_size} must be a multiple of the "
                           f"data-parallel ranks ({dp}); set it to a multiple of {dp}")
    per_rank = tr.global_batch_size // dp
    micro = min(tr.micro_batch_size, per_rank)
    if per_rank % micro:
        raise L3TrainError(f"training.micro_batch_size={micro} must divide a rank's share of the global batch "
                           f"({tr.global_batch_size} / {dp} ranks = {per_rank}); set it to a divisor of {per_rank}")
    layout = WorldLayout(world_size, tp, dp, ep, micro, per_rank // micro,
                         rows_sharded=bool(cfg.l3.after_blocks) and cfg.parallel.shard_l3_rows and world_size > 1,
                         experts_split=ep > 1, zero_stage=effective_zero_stage(cfg, dp))
    if layout.rank_local_parameters and tr.precision == "bf16" and cfg.parallel.zero_stage < 2:
        raise L3TrainError(f"sharded L³ rows or experts in bf16 need parallel.zero_stage 2 or 3 (got "
                           f"{cfg.parallel.zero_stage}), or parallel.shard_l3_rows=false and moe.expert_parallel=1")
    return layout


def _set_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise L3TrainError(f"override {assignment!r}: expected key.sub=value, e.g. training.steps=100")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise L3TrainError(f"override {dotted}: {'.'.join(keys[:depth + 1])} is not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise L3TrainError(f"override {dotted}: cannot parse value {raw!r} ({problem}); values are YAML, "
                           f"e.g. [1, 3] or 3e-4") from None


def config_from_dict(tree: dict[str, Any], overrides: list[str] = ()) -> Config:
    """Build and validate a Config from nested dicts plus `key.sub=value` overrides."""
    tree = copy.deepcopy(tree) if tree else {}
    for assignment in overrides:
        _set_override(tree, assignment)
    cfg = _build(Config, tree, "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Load a YAML config, apply overrides, validate; errors name the offending key."""
    path = Path(path)
    if not path.is_file():
        raise L3TrainError(f"config file {path} not found; pass one of the files in configs/")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise L3TrainError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    return config_from_dict(tree, overrides)
