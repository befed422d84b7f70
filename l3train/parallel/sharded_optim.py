"""Optimizer, global gradient clipping and checkpoints of parameters that live on one rank only:
the L³ rows sharded over TP×DP (`ShardedRows`) and the experts split by expert parallelism
(`ShardedExperts`).

Why outside DeepSpeed: these tensors differ across ranks (even in shape for the rows), so
ZeRO must never partition, gather or all-reduce them. They are not parameters of the
module DeepSpeed wraps; this module gives them what DeepSpeed gives the dense parameters:

- their own `torch.optim.AdamW` (rows: l3.lr / l3.weight_decay; experts: the dense lr and
  weight decay; the dense betas/eps) and the same warmup + cosine LambdaLR, stepped right
  after `engine.step()` at each accumulation boundary. Gradients accumulate correctly over
  micro-batches because DeepSpeed's `engine.backward` scales the loss by 1/GAS, and the
  lookups scale these tensors' gradients by 1/DP (the DP average); experts are then summed
  over their expert-data-parallel copies (`prepare_gradients`);
- gradient clipping by the global norm of a single process, total² = dense² + Σ of every
  distinct rank-local gradient² (`clip_global_norm`): DeepSpeed computes dense from its
  reduced gradients, then clips with a threshold chosen so that its coefficient is
  max_norm / (total + 1e-6), and the rank-local tensors are scaled by the same coefficient;
- checkpoints: every rank writes `l3_rows_rank{rank:05d}.pt` / `experts_rank{rank:05d}.pt`
  (tensors, AdamW and scheduler state, layout) into the checkpoint's staging directory; a
  resume verifies the layout (shard plan and TP×DP, or expert split) against this run's.

ZeRO stages 0-3 are supported in fp32; in bf16 ZeRO-2 and 3 (DeepSpeed wraps bf16 at stages
0 and 1 in its FP16/BF16 optimizers, whose norm is not exposed before their step: the trainer
refuses that combination in one line).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from l3train.config import Config
from l3train.errors import L3TrainError
from l3train.optim import build_scheduler
from l3train.parallel.expert_parallel import ExpertParallelDispatch
from l3train.parallel.shard_plan import ShardPlan
from l3train.parallel.sharded_l3 import ShardedRowAttention

# DeepSpeed clips by dividing by (norm + 1e-6) / threshold; the same epsilon keeps the
# rank-local coefficient identical to the one DeepSpeed applies to the dense gradients.
_CLIP_EPS = 1e-6


def rank_file(kind: str, rank: int) -> str:
    return f"{kind}_rank{rank:05d}.pt"


class RankLocalParameters(ABC):
    """Tensors held by this rank only, with their AdamW and LR schedule; subclasses say what
    they are (`kind`, the checkpoint file stem) and how their layout is checked on resume."""

    kind = ""

    def __init__(self, params: list[nn.Parameter], lr: float, weight_decay: float, cfg: Config,
                 copies: int = 1) -> None:
        self.params = params
        self.copies = copies  # ranks holding an identical copy of each gradient (counted once in the norm)
        opt = cfg.optimizer
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                                           weight_decay=weight_decay)
        self.scheduler = build_scheduler(self.optimizer, cfg)

    def prepare_gradients(self) -> None:
        """At the accumulation boundary: a tensor that received no gradient gets zeros, as its
        rows or experts would in one process (where they are slices of a larger gradient)."""
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)

    def squared_grad_norm(self) -> torch.Tensor:
        """This rank's share of the world's Σ of squared gradients (summed over all ranks, every
        distinct gradient counts once)."""
        total = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        for param in self.params:
            total += param.grad.detach().float().square().sum()
        return total / self.copies

    def scale_gradients(self, coefficient: float) -> None:
        for param in self.params:
            param.grad.mul_(coefficient)

    def step(self) -> None:
        """AdamW step and LR schedule, then clear the gradients."""
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)

    @abstractmethod
    def layout(self) -> dict:
        """What must match between the checkpoint and this run, besides the tensor shapes."""

    def check_layout(self, saved: dict, path: Path) -> None:
        if saved != self.layout():
            raise L3TrainError(f"cannot resume from {path}: it was written for {saved}, this rank has "
                               f"{self.layout()} (resharding checkpoints is not supported)")

    def save(self, directory: Path, rank: int) -> None:
        torch.save({"tensors": [param.detach().cpu() for param in self.params],
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "layout": self.layout()}, directory / rank_file(self.kind, rank))

    def load(self, directory: Path, rank: int) -> None:
        """Restore this rank's tensors and optimizer state from checkpoint `directory`."""
        path = directory / rank_file(self.kind, rank)
        if not path.is_file():
            raise L3TrainError(f"cannot resume {directory}: it has no {path.name}; it was written with another "
                               f"parallel layout (resharding checkpoints is not supported)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.check_layout(state["layout"], path)
        if len(state["tensors"]) != len(self.params):
            raise L3TrainError(f"{path} holds {len(state['tensors'])} tensors, this run has {len(self.params)}")
        with torch.no_grad():
            for param, saved in zip(self.params, state["tensors"]):
                if saved.shape != param.shape:
                    raise L3TrainError(f"{path}: a tensor of shape {tuple(saved.shape)}, expected "
                                       f"{tuple(param.shape)}; the checkpoint's layout does not match this run")
                param.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class ShardedRows(RankLocalParameters):
    """This rank's L³ rows of every sharded layer (shard `shard` of `plan`)."""

    kind = "l3_rows"

    def __init__(self, attentions: list[ShardedRowAttention], plan: ShardPlan, shard: int, cfg: Config) -> None:
        self.plan, self.shard = plan, shard
        super().__init__([table for attention in attentions for table in attention.tables()],
                         cfg.l3.lr if cfg.l3.lr is not None else cfg.optimizer.lr, cfg.l3.weight_decay, cfg)

    def layout(self) -> dict:
        return {"plan": self.plan.state_dict(), "shard": self.shard}

    def check_layout(self, saved: dict, path: Path) -> None:
        """The same allocation and number of shards (verified through the plan) and this rank's shard."""
        ShardPlan.from_state_dict(saved["plan"], expect_rows_per_token=self.plan.rows_per_token,
                                  expect_num_shards=self.plan.num_shards, source=str(path))
        if saved["shard"] != self.shard:
            raise L3TrainError(f"{path} holds shard {saved['shard']}, this rank's is {self.shard}")


class ShardedExperts(RankLocalParameters):
    """This rank's experts of every MoE layer under expert parallelism."""

    kind = "experts"

    def __init__(self, dispatches: list[ExpertParallelDispatch], ep_rank: int, expert_dp_group,
                 expert_dp_size: int, cfg: Config) -> None:
        self.dispatches, self.ep_rank = dispatches, ep_rank
        self.expert_dp_group, self.expert_dp_size = expert_dp_group, expert_dp_size
        super().__init__([weight for dispatch in dispatches for weight in dispatch.tables()], cfg.optimizer.lr,
                         cfg.optimizer.weight_decay, cfg, copies=expert_dp_size)

    def prepare_gradients(self) -> None:
        super().prepare_gradients()
        for dispatch in self.dispatches:
            dispatch.reduce_gradients(self.expert_dp_group, self.expert_dp_size)

    def layout(self) -> dict:
        return {"num_experts": [dispatch.num_experts for dispatch in self.dispatches],
                "expert_parallel": self.dispatches[0].ep_size, "ep_rank": self.ep_rank}


def check_layout(checkpoint_dir: Path, num_shards: int | None, expert_files: int | None = None) -> None:
    """Refuse, in one line, a checkpoint whose L³ rows are sharded over another number of ranks
    (`num_shards` None: this run does not shard them), or whose experts were split into
    another number of per-rank files (`expert_files` None: no expert parallelism)."""
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


def module_grad_norm(model: nn.Module, parallel) -> float:
    """Global norm of `model`'s gradients at ZeRO-0, where DeepSpeed does not report it before
    its step (gradients are whole and already averaged over DP after the boundary backward)."""
    if parallel.tp_size > 1:
        from l3train.parallel.tensor_parallel import tensor_parallel_grad_norm

        return tensor_parallel_grad_norm(model, parallel)
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def dense_grad_norm(engine, model: nn.Module, parallel) -> float:
    """Global norm of the dense (DeepSpeed-managed) gradients after the boundary backward,
    before `engine.step()`: from the whole, already averaged `p.grad` at ZeRO-0, from the
    ZeRO optimizer's reduced partitions at stages 1-3."""
    from deepspeed.runtime.utils import combine_grad_norm_groups
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    optimizer = engine.optimizer
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        return float(optimizer.scaled_global_norm()) / optimizer.loss_scale
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return float(combine_grad_norm_groups(optimizer._get_norm_groups())) / optimizer.loss_scale
    if isinstance(optimizer, torch.optim.Optimizer) and engine.zero_optimization_stage() == 0:
        return module_grad_norm(model, parallel)
    raise L3TrainError(f"sharded L³ rows cannot clip jointly with DeepSpeed's {type(optimizer).__name__}; "
                       f"use parallel.zero_stage=2 or 3, or parallel.shard_l3_rows=false")


def clip_global_norm(engine, model: nn.Module, parallel, rank_local: list[RankLocalParameters],
                     max_norm: float) -> float:
    """Make this step's clipping that of one process; returns the global norm before clipping.

    Call at the accumulation boundary between the last `engine.backward` and `engine.step()`.
    total = sqrt(dense² + Σ rank-local²) (the rank-local shares are summed over the world,
    each distinct gradient once). DeepSpeed multiplies the dense gradients by
    threshold / (dense + 1e-6) when that is < 1; with threshold = max_norm·(dense + 1e-6)/(total + 1e-6)
    this is the single-process coefficient max_norm / (total + 1e-6), which the rank-local
    tensors get too. The threshold lives in the ZeRO optimizers' `clip_grad` and, at ZeRO-0,
    in the engine config's `gradient_clipping`.
    """
    for part in rank_local:
        part.prepare_gradients()
    dense = dense_grad_norm(engine, model, parallel)
    local_squared = torch.zeros((), dtype=torch.float32, device=rank_local[0].params[0].device)
    for part in rank_local:
        local_squared += part.squared_grad_norm()
    dist.all_reduce(local_squared)
    total = (dense ** 2 + local_squared.item()) ** 0.5
    if max_norm > 0:
        threshold = max_norm * (dense + _CLIP_EPS) / (total + _CLIP_EPS)
        if hasattr(engine.optimizer, "clip_grad"):
            engine.optimizer.clip_grad = threshold
        else:
            engine._config.gradient_clipping = threshold
        coefficient = max_norm / (total + _CLIP_EPS)
        if coefficient < 1.0:
            for part in rank_local:
                part.scale_gradients(coefficient)
    return total
