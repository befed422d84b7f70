"""Optimizer, global gradient clipping and checkpoints of parameters that live on one rank only:
the L³ rows sharded over TP×DP (`ShardedRows`) and the experts split by expert parallelism
(`ShardedExperts`).

Why outside DeepSpeed: these tensors differ across ranks (even in shape for the rows), so
ZeRO must never partition, gather or all-reduce them. They are not parameters of the
module DeepSpeed wraps; this module gives them what DeepSpeed gives the dense parameters:

- their own `torch.optim.AdamW` (rows: the hyperparameters of the `l3_rows` group, l3.lr /
  l3.weight_decay; experts: those of the `dense` group) and the same warmup + cosine LambdaLR, stepped right
  after `engine.step()` at each accumulation boundary. Gradients accumulate correctly over
  micro-batches because DeepSpeed's `engine.backward` scales the loss by 1/GAS; the rows'
  gradients are the sum over the DP ranks whose positions they served, scaled by 1/DP (the
  DP average) at the boundary (`gradient_scale`, applied by `scale_gradients` in the same
  pass as the clipping coefficient); experts are summed over their expert-data-parallel
  copies (`prepare_gradients`) and scaled in their forward;
- gradient clipping by the global norm of a single process, total² = dense² + Σ of every
  distinct rank-local gradient² (`squared_grad_norm` here; the clipping itself is the
  trainer's, l3train.trainer.clipping);
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
from torch import nn

from l3train.config import Config
from l3train.errors import L3TrainError
from l3train.model.l3_cpu import gradient_rows
from l3train.optim import SkippableAdamW, build_scheduler, group_hyperparameters
from l3train.parallel.expert_parallel import ExpertParallelExperts
from l3train.parallel.shard_plan import ShardPlan
from l3train.parallel.sharded_l3 import ShardedRowTable
from l3train.parallel.state import ParallelState


RESHARD_HINT = "(or move the checkpoint to this layout with tools/convert_checkpoint.py reshard)"


def rank_file(kind: str, rank: int) -> str:
    return f"{kind}_rank{rank:05d}.pt"


class RankLocalParameters(ABC):
    """Tensors held by this rank only, with their AdamW and LR schedule; subclasses say what
    they are (`kind`, the checkpoint file stem) and how their layout is checked on resume."""

    kind = ""

    def __init__(self, params: list[nn.Parameter], group: str, cfg: Config, copies: int = 1,
                 gradient_scale: float = 1.0) -> None:
        """`group`: whose hyperparameters these tensors take (l3train.optim.group_hyperparameters);
        `gradient_scale`: what the accumulated gradients are multiplied by at the boundary."""
        self.params = params
        self.copies = copies  # ranks holding an identical copy of each gradient (counted once in the norm)
        self.gradient_scale = gradient_scale
        # Fused like the dense optimizer (l3train.optim.build_optimizer): the same arithmetic as
        # the rows get in one process.
        self.optimizer = SkippableAdamW([{"name": group, "params": params, **group_hyperparameters(group, cfg)}],
                                        fused=True)
        self.scheduler = build_scheduler(self.optimizer, cfg)

    def prepare_gradients(self) -> None:
        """At the accumulation boundary: a tensor that received no gradient gets zeros, as its
        rows or experts would in one process (where they are slices of a larger gradient). A
        row-sparse gradient (the sharded rows' on CPUs) accumulated over micro-batches is
        coalesced (a row's parts summed), which the norm, the scaling and the step expect."""
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            elif param.grad.is_sparse and not param.grad.is_coalesced():
                param.grad = param.grad.coalesce()

    def squared_grad_norm(self) -> torch.Tensor:
        """This rank's share of the world's Σ of squared gradients, with `gradient_scale` applied
        (summed over all ranks, every distinct gradient counts once)."""
        total = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        for param in self.params:
            # Row norms, then their squares summed: one pass without a table-sized temporary,
            # as exact as square().sum() (a row's 128-odd products, then a cascade over rows).
            grad = gradient_rows(param.grad).detach().float()
            total += torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), dim=1).square().sum()
        return total * self.gradient_scale ** 2 / self.copies

    def scale_gradients(self, coefficient: float) -> None:
        """At every accumulation boundary, after the norm: multiply the gradients by the
        clipping coefficient (1 when not clipping) and `gradient_scale`, in place, one pass."""
        factor = coefficient * self.gradient_scale
        if factor != 1.0:
            for param in self.params:
                gradient_rows(param.grad).mul_(factor)

    def step(self, skip: bool = False) -> None:
        """AdamW step (none when `skip`: the step's loss or gradient was not finite; row-sparse
        gradients included: `SkippableAdamW`) and LR schedule, then clear the gradients."""
        if not skip:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()  # to None: the next backward hands its fresh gradients over, no add into zeros

    @abstractmethod
    def layout(self) -> dict:
        """What must match between the checkpoint and this run, besides the tensor shapes."""

    def check_layout(self, saved: dict, path: Path) -> None:
        if saved != self.layout():
            raise L3TrainError(f"cannot resume from {path}: it was written for {saved}, this rank has "
                               f"{self.layout()} {RESHARD_HINT}")

    def save(self, directory: Path, rank: int) -> None:
        torch.save({"tensors": [param.detach().cpu() for param in self.params],
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "layout": self.layout()}, directory / rank_file(self.kind, rank))

    def load(self, directory: Path, rank: int) -> None:
        """Restore this rank's tensors and optimizer state from checkpoint `directory`."""
        path = directory / rank_file(self.kind, rank)
        if not path.is_file():
            raise L3TrainError(f"cannot resume {directory}: it has no {path.name}; it was written with another "
                               f"parallel layout {RESHARD_HINT}")
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

    def __init__(self, backends: list[ShardedRowTable], plan: ShardPlan, cfg: Config) -> None:
        self.plan, self.shard, self.transport = plan, backends[0].routing.shard, backends[0].transport
        super().__init__([table for backend in backends for table in backend.tables()], "l3_rows", cfg,
                         gradient_scale=backends[0].gradient_scale)

    def layout(self) -> dict:
        return {"plan": self.plan.state_dict(), "shard": self.shard}

    def check_layout(self, saved: dict, path: Path) -> None:
        """The same allocation and number of shards (verified through the plan), the same owner
        of every token, and this rank's shard."""
        plan = ShardPlan.from_state_dict(saved["plan"], expect_rows_per_token=self.plan.rows_per_token,
                                         expect_num_shards=self.plan.num_shards, source=str(path))
        if plan.ownership_hash != self.plan.ownership_hash:
            raise L3TrainError(f"{path} was sharded with token ownership {plan.ownership_hash}, this run's shard "
                               f"plan gives {self.plan.ownership_hash}; its rows would land in the wrong tokens "
                               f"{RESHARD_HINT}")
        if saved["shard"] != self.shard:
            raise L3TrainError(f"{path} holds shard {saved['shard']}, this rank's is {self.shard}")


class ShardedExperts(RankLocalParameters):
    """This rank's experts of every MoE layer under expert parallelism."""

    kind = "experts"

    def __init__(self, backends: list[ExpertParallelExperts], parallel: ParallelState, cfg: Config) -> None:
        self.backends, self.parallel = backends, parallel
        super().__init__([weight for backend in backends for weight in backend.tables()], "dense", cfg,
                         copies=parallel.dp_size // parallel.ep_size)

    def prepare_gradients(self) -> None:
        super().prepare_gradients()
        for backend in self.backends:
            backend.reduce_gradients()

    def layout(self) -> dict:
        return {"num_experts": [backend.num_experts for backend in self.backends],
                "expert_parallel": self.parallel.ep_size, "ep_rank": self.parallel.ep_rank}
