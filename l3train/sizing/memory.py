"""Per-GPU memory of a training run, planned from its config and world (tools/memory_plan.py).

A rank holds, in bytes:
- The module DeepSpeed wraps (Ψ: its elements on this rank, its TP share; lp: 2 in bf16, 4
  in fp32; DP data-parallel ranks):

    DeepSpeed      parameters   gradients            optimizer (fp32 master + 2 Adam moments)
    ZeRO-0 fp32    4Ψ           4Ψ                   8Ψ      (the client AdamW on the weights)
    ZeRO-0 bf16    2Ψ           2Ψ                   12Ψ     (DeepSpeed's FP16_UnfusedOptimizer)
    ZeRO-1         lp·Ψ         lp·Ψ (whole)         12Ψ/DP
    ZeRO-2         lp·Ψ         4Ψ/DP (fp32)         12Ψ/DP
    ZeRO-3         lp·Ψ/DP      4Ψ/DP (fp32)         12Ψ/DP

  (measured on DeepSpeed 0.19.8 with the gradient data types of
  `deepspeed_adapter.engine_config`: fp32 accumulation at ZeRO 2/3 in bf16), plus DeepSpeed's
  gradient bucket of `GRADIENT_BUCKET_ELEMENTS`: in the model's dtype during backward at
  ZeRO 1/2, fp32 and kept at ZeRO-3, at ZeRO-0 a flat copy of up to that many gradients
  while they are all-reduced (none on a single rank, which the trainer does not let
  DeepSpeed all-reduce with itself). ZeRO-3's gathered parameters in forward and backward are not
  counted.
- Rank-local tensors, outside DeepSpeed (l3train.parallel.sharded_optim): the sharded L³ rows
  (the fullest shard of the allocation's shard plan; without the allocation, v/(TP·DP) rows)
  and expert-parallel experts, 16 bytes per element in any precision (fp32 weights and
  gradients, fused AdamW's two fp32 moments). On CPUs the sharded rows' gradient is
  row-sparse (the rows a step touched, with an 8-byte index each): the plan counts a dense
  gradient, every row, and leaves out the indices (3% at 128 columns) and the moment in
  backward when, over several micro-batches, the sum and its summands coexist. Unsharded tables (one rank, or
  parallel.shard_l3_rows=false) are ordinary DeepSpeed parameters; alone at ZeRO-0 in fp32 their
  gradient on a CPU is row-sparse too (`deepspeed_adapter.hands_gradients_over`), planned as dense.
- Activations of one micro-batch: see `activation_estimate`.

The total adds every peak as if they coincided (the gradient bucket lives in backward, when
part of the activations is already freed): an upper bound for planning. `MemoryPlan.fits`
keeps a margin of the device for what is not planned: the CUDA context, NCCL's buffers,
allocator fragmentation and kernels' workspaces.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass

import numpy as np

from l3train.config import GRADIENT_BUCKET_ELEMENTS, Config, WorldLayout, validate_for_world
from l3train.errors import L3TrainError
from l3train.parallel.shard_plan import plan_shards
from l3train.sizing.accounting import config_allocation

FP32 = 4
DEFAULT_MARGIN = 0.10
DEVICES = ("cuda", "cpu")  # whose kernels the activation estimate assumes
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class Holding:
    """Bytes of one owner's tensors on one rank."""

    parameters: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation bytes of one micro-batch on one rank."""

    stored: int  # kept from the forward pass for backward (with the logits the trainer holds)
    recomputed: int  # the largest recomputed block's, rebuilt in backward (0 without recomputation)

    @property
    def total(self) -> int:
        return self.stored + self.recomputed


@dataclass(frozen=True)
class MemoryPlan:
    """What one GPU holds when `config` trains on `nodes` × `gpus_per_node` ranks."""

    config: str
    nodes: int
    gpus_per_node: int
    layout: WorldLayout
    zero_stage: int
    precision: str
    recompute: str
    sequence_length: int
    device: str  # whose kernels the activations assume
    deepspeed: Holding  # the module DeepSpeed wraps: backbone, L³ dense parts, unsharded tables
    rows: Holding  # this rank's sharded L³ rows
    experts: Holding  # this rank's expert-parallel experts
    buffers: int  # DeepSpeed's gradient bucket
    activations: ActivationEstimate

    @property
    def total(self) -> int:
        return (self.deepspeed.total + self.rows.total + self.experts.total + self.buffers
                + self.activations.total)

    def fits(self, device_bytes: int, margin: float = DEFAULT_MARGIN) -> bool:
        """Whether the total leaves `margin` of the device free (see the module docstring)."""
        return self.total <= (1 - margin) * device_bytes


@dataclass(frozen=True)
class RankElements:
    """Parameter elements on one rank, by owner."""

    deepspeed: int
    rows: int  # the fullest shard's
    experts: int


def plan_memory(cfg: Config, name: str, nodes: int, gpus_per_node: int, rows: int | None = None,
                device: str = "cuda") -> MemoryPlan:
    """The plan of `cfg` (called `name`) on `nodes` × `gpus_per_node` ranks with `device`'s kernels.
    The L³ tables have `rows` rows per layer when given, else those of the allocation `l3.allocation`."""
    if nodes < 1 or gpus_per_node < 1:
        raise L3TrainError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    layout = validate_for_world(cfg, nodes * gpus_per_node)
    elements = rank_elements(cfg, layout, rows)
    stage, precision = layout.zero_stage, cfg.training.precision
    return MemoryPlan(name, nodes, gpus_per_node, layout, stage, precision, cfg.training.recompute,
                      cfg.data.seq_length, device,
                      deepspeed_holding(elements.deepspeed, stage, precision, layout.data_parallel),
                      _rank_local_holding(elements.rows), _rank_local_holding(elements.experts),
                      gradient_bucket_bytes(elements.deepspeed, stage, precision, layout.world_size),
                      activation_estimate(cfg, layout, device))


def _rank_local_holding(elements: int) -> Holding:
    """Rank-local tensors: fp32 weights and gradients, and fused AdamW's two fp32 moments."""
    return Holding(FP32 * elements, FP32 * elements, 2 * FP32 * elements)


def deepspeed_holding(elements: int, zero_stage: int, precision: str, data_parallel: int) -> Holding:
    """Bytes DeepSpeed holds for `elements` parameters of this rank (table in the module docstring)."""
    model = _element_bytes(precision)
    if zero_stage == 0:
        master = FP32 * elements if precision == "bf16" else 0
        return Holding(model * elements, model * elements, master + 2 * FP32 * elements)
    partition = math.ceil(elements / data_parallel)
    parameters = model * (partition if zero_stage == 3 else elements)
    gradients = model * elements if zero_stage == 1 else FP32 * partition
    return Holding(parameters, gradients, 3 * FP32 * partition)


def gradient_bucket_bytes(elements: int, zero_stage: int, precision: str, world_size: int) -> int:
    """DeepSpeed's gradient bucket (module docstring)."""
    if zero_stage == 0 and world_size == 1:
        return 0
    if zero_stage == 3:
        return FP32 * GRADIENT_BUCKET_ELEMENTS
    bucket = GRADIENT_BUCKET_ELEMENTS if zero_stage else min(elements, GRADIENT_BUCKET_ELEMENTS)
    return _element_bytes(precision) * bucket


def rank_elements(cfg: Config, layout: WorldLayout, rows: int | None = None) -> RankElements:
    """Elements of the parameters one rank holds, counted on the meta-device model of `cfg`:
    tensor-parallel ones by `tensor_parallel_dim`, rank-local ones by parameter role."""
    rows_per_token, shard_fraction = _table_rows(cfg, layout, rows)  # before the slow imports: it checks input
    from l3train.model.build import meta_model
    from l3train.model.roles import ParamRole, parameter_roles
    from l3train.parallel.tp_dims import tensor_parallel_dim

    deepspeed = tables = experts = 0
    for name, param, role in parameter_roles(meta_model(cfg, rows_per_token)):
        if role is ParamRole.L3_ROWS and layout.rows_sharded:
            tables += param.numel()
        elif role is ParamRole.EXPERT and layout.experts_split:
            experts += param.numel() // layout.expert_parallel
        elif tensor_parallel_dim(name) is not None:
            deepspeed += param.numel() // layout.tensor_parallel
        else:
            deepspeed += param.numel()
    return RankElements(deepspeed, math.ceil(tables * shard_fraction), experts)


def _table_rows(cfg: Config, layout: WorldLayout, rows: int | None) -> tuple[np.ndarray | None, float]:
    """Rows per token of the L³ tables (None without L³ layers), and the fraction of them the
    fullest shard holds: by the shard plan the trainer makes from the allocation; with `rows`
    instead, spread evenly over the vocabulary and the shards."""
    if not cfg.l3.after_blocks:
        return None, 0.0
    shards = layout.tensor_parallel * layout.data_parallel
    if rows is not None:
        vocab = cfg.model.vocab_size
        if rows < 1:
            raise L3TrainError(f"--rows must be >= 1, got {rows}")
        even = np.full(vocab, rows // vocab, dtype=np.int64)
        even[:rows % vocab] += 1
        return even, math.ceil(rows / shards) / rows
    allocation = config_allocation(cfg, "pass --rows to plan without it")
    total = int(allocation.rows_per_token.sum())
    if not layout.rows_sharded:
        return allocation.rows_per_token, 1.0
    plan = plan_shards(allocation.rows_per_token, allocation.token_frequencies, shards)
    return allocation.rows_per_token, int(plan.rows_per_shard().max()) / total


def activation_estimate(cfg: Config, layout: WorldLayout, device: str = "cuda") -> ActivationEstimate:
    """Activation bytes of one micro-batch of B = `layout.micro_batch_size` sequences of S tokens,
    with the kernels of `device` ("cuda" or "cpu").

    What autograd saves for backward, per position, with a = 2 bytes in bf16, 4 in fp32, d model
    width, f SwiGLU width, H/K query/KV heads, V vocabulary, T tensor-parallel ranks, and P = T
    under sequence parallelism, else 1. An RMSNorm of width w keeps n(w) bytes: on the CPU
    (torch's composite) 4·(2w+1), its input widened to fp32, x·rstd and rstd; on CUDA (torch's
    fused kernel, apex) a·w + 4, its input and rstd. Its output is kept by its reader.

        decoder block   [2·n(d)]/P + 2a·d           two RMSNorms (P splits them), their outputs
                                                    (read whole)
                        + [a·(2d + 2d·K/H + 4f) + 4H]/T
                                                    q, k, v, attention output, the softmax's
                                                    log-sum-exp; SwiGLU w1·x, silu, w3·x, product
        MoE block       the SwiGLU term becomes a·k·(3d + 4h + 1) + 4·(2E + k + 1) + 24k, and the
                        router reads its norm's output in fp32 (4d instead of a·d): gathered
                        inputs, expert outputs, their gated copies and gates, each expert's
                        SwiGLU; router logits, softmax, top-k gates, log-sum-exp and indices (E
                        experts of h, top k)
        L³ block        [n(d) + n(d_up) + a·(d_up + d)]/P  its RMSNorm, W_up's norm, the
                                                    concatenation W_mix reads
                        + local rows:   [a·d + 4 + o]/P  the lookup's input and log-sum-exp, and
                                        its output o: a·d_emb on CUDA (Triton), 4·d_emb in fp32
                                        plus its narrowed copy in bf16 on the CPU
                        + sharded rows: a·d_emb/P + (4d + 4·d_emb + 4 + 24)/T  assembled output;
                                        the owner's fp32 positions, output, log-sum-exp; routing
                                        indices
        head            n(d)/P + a·d + (a + 4)·V/T + 8   final norm and output; the logits the
                                                    trainer holds and the loss's fp32 log-softmax;
                                                    the token ids. Under TP in fp32, megatron's
                                                    loss computes its softmax in the logits
                                                    themselves: 4·V/T instead.

    summed over the blocks for B·S positions (`stored`). `training.recompute` keeps only each
    recomputed block's input, a·d/P per position, and backward rebuilds one recomputed block
    at a time (`recomputed`: the largest). The CPU terms are measured by
    tests/unit/test_memory_plan.py and tests/integration/test_memory_plan_against_training.py; the CUDA ones
    follow from the kernels' saved tensors (not measured here). Not counted: the lookups'
    routes (index plans built once per micro-batch, ~0.2 KB per position in those tests,
    against ~100 KB per position of one decoder block at the paper's widths).
    """
    if device not in DEVICES:
        raise L3TrainError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    m, tr = cfg.model, cfg.training
    shape = _ActivationShape(_element_bytes(tr.precision), layout.tensor_parallel,
                             layout.tensor_parallel if cfg.parallel.sequence_parallel else 1, layout.rows_sharded,
                             device == "cuda")
    positions = layout.micro_batch_size * cfg.data.seq_length
    blocks = [_decoder_block_bytes(cfg, index in cfg.moe.blocks, shape) for index in range(m.n_layers)]
    lookups = [_lookup_block_bytes(cfg, shape)] * len(cfg.l3.after_blocks)
    block_input = shape.a * m.d_model / shape.sequence_split
    kept = {"none": blocks + lookups, "blocks": [block_input] * (len(blocks) + len(lookups)),
            "l3": blocks + [block_input] * len(lookups)}[tr.recompute]
    rebuilt = {"none": [], "blocks": blocks + lookups, "l3": lookups}[tr.recompute]
    return ActivationEstimate(stored=math.ceil(positions * (sum(kept) + _head_bytes(cfg, shape))),
                              recomputed=math.ceil(positions * max(rebuilt, default=0)))


@dataclass(frozen=True)
class _ActivationShape:
    a: int  # bytes of an activation element
    tensor_parallel: int
    sequence_split: int  # T under sequence parallelism, else 1
    rows_sharded: bool
    cuda: bool  # CUDA's kernels, else the CPU's

    def norm(self, width: int) -> float:
        """What an RMSNorm keeps per position (see `activation_estimate`)."""
        return self.a * width + FP32 if self.cuda else FP32 * (2 * width + 1)


def _decoder_block_bytes(cfg: Config, moe_block: bool, shape: _ActivationShape) -> float:
    m, a, tp = cfg.model, shape.a, shape.tensor_parallel
    norms = 2 * shape.norm(m.d_model) / shape.sequence_split + a * m.d_model
    attention = (a * (2 * m.d_model + 2 * m.d_model * m.n_kv_heads / m.n_heads) + FP32 * m.n_heads) / tp
    if not moe_block:
        return norms + attention + a * m.d_model + a * 4 * m.ffn_hidden_size / tp
    moe = cfg.moe
    experts = a * moe.top_k * (3 * m.d_model + 4 * moe.expert_hidden_size + 1)
    router = FP32 * (m.d_model + 2 * moe.num_experts + moe.top_k + 1) + 24 * moe.top_k
    return norms + attention + experts + router


def _lookup_block_bytes(cfg: Config, shape: _ActivationShape) -> float:
    d, l3, a = cfg.model.d_model, cfg.l3, shape.a
    dense = (shape.norm(d) + shape.norm(l3.d_up) + a * (l3.d_up + d)) / shape.sequence_split
    if shape.rows_sharded:
        owner = FP32 * (d + l3.d_emb + 1) + 24
        return dense + a * l3.d_emb / shape.sequence_split + owner / shape.tensor_parallel
    output = a * l3.d_emb if shape.cuda else FP32 * l3.d_emb + (a * l3.d_emb if a != FP32 else 0)
    return dense + (a * d + FP32 + output) / shape.sequence_split


def _head_bytes(cfg: Config, shape: _ActivationShape) -> float:
    d, a, tp = cfg.model.d_model, shape.a, shape.tensor_parallel
    softmax_in_logits = tp > 1 and a == FP32  # megatron's vocab-parallel loss works in place
    logits = (a + (0 if softmax_in_logits else FP32)) * cfg.model.vocab_size / tp
    return shape.norm(d) / shape.sequence_split + a * d + logits + 8


def _element_bytes(precision: str) -> int:
    """Bytes of a weight or activation element in `precision` (training.precision)."""
    return 2 if precision == "bf16" else FP32


def parse_size(text: str) -> int:
    """Bytes of a size such as "80GB" (10⁹) or "141GiB" (2³⁰); a plain number is bytes."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not found:
        raise L3TrainError(f"--device-memory: expected a size such as 80GB or 141GiB, got {text!r}")
    return int(float(found.group(1)) * _UNITS[(found.group(2) or "B").upper()])


def format_bytes(count: float) -> str:
    """GB (10⁹ bytes) from 1 GB up, else MB; nothing is 0."""
    if not count:
        return "0"
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


TABLE_COLUMNS = ("config", "nodes×GPUs", "TP×DP", "ZeRO, precision", "micro-batch", "recompute", "parameters",
                 "gradients", "optimizer", "sharded rows", "rows' grads + AdamW", "activations",
                 "DeepSpeed bucket", "total")


def table_row(plan: MemoryPlan, device_bytes: int, margin: float = DEFAULT_MARGIN) -> list[str]:
    """One plan's cells under `TABLE_COLUMNS` and the verdict for a device of `device_bytes`."""
    layout, local = plan.layout, (plan.rows, plan.experts)
    sizes = [plan.deepspeed.parameters, plan.deepspeed.gradients, plan.deepspeed.optimizer,
             sum(part.parameters for part in local), sum(part.gradients + part.optimizer for part in local),
             plan.activations.total, plan.buffers, plan.total]
    return [plan.config, f"{plan.nodes}×{plan.gpus_per_node}", f"{layout.tensor_parallel}×{layout.data_parallel}",
            f"{plan.zero_stage}, {plan.precision}", f"{layout.micro_batch_size}×{plan.sequence_length}",
            plan.recompute, *map(format_bytes, sizes), "yes" if plan.fits(device_bytes, margin) else "no"]


def markdown_table(plans: list[MemoryPlan], device_bytes: int, margin: float = DEFAULT_MARGIN) -> str:
    """The plans as a markdown table, the last column saying whether each fits `device_bytes`."""
    header = [*TABLE_COLUMNS, f"fits {format_bytes(device_bytes)}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(table_row(plan, device_bytes, margin)) + " |" for plan in plans]
    return "\n".join(lines)


def plan_json(plans: list[MemoryPlan], device_bytes: int, margin: float = DEFAULT_MARGIN) -> str:
    """The plans with every figure in bytes, and each one's verdict, as JSON."""
    return json.dumps([{**dataclasses.asdict(plan), "total": plan.total, "device_bytes": device_bytes,
                        "margin": margin, "fits": plan.fits(device_bytes, margin)} for plan in plans], indent=1)


def plan_notes(plans: list[MemoryPlan], device_bytes: int, margin: float = DEFAULT_MARGIN) -> list[str]:
    """What the table's figures are, and what to change for each plan that does not fit."""
    usable = (1 - margin) * device_bytes
    notes = [f"Per GPU. fits: the total within {format_bytes(usable)} ({1 - margin:.0%} of "
             f"{format_bytes(device_bytes)}; the rest for the CUDA context, NCCL buffers and fragmentation). "
             f"parameters, gradients, optimizer: what DeepSpeed holds (fp32 master weights and Adam moments in "
             f"optimizer); sharded rows: the fullest rank's L³ rows (and expert-parallel experts), fp32 with "
             f"their own AdamW; activations: one micro-batch; l3train/sizing/memory.py has the formulas."]
    notes += [f"{plan.config} on {plan.nodes}×{plan.gpus_per_node} GPUs needs {format_bytes(plan.total)}: lower "
              f"training.micro_batch_size, set training.recompute=blocks or l3, or raise --zero or --tp"
              for plan in plans if not plan.fits(device_bytes, margin)]
    return notes
