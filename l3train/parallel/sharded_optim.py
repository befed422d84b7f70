"""Optimizer, global gradient clipping and checkpoints of the L³ rows sharded over TP×DP.

Why outside DeepSpeed: the sharded rows (l3train.parallel.sharded_l3) are disjoint across
all ranks and even differ in shape between ranks, so ZeRO must never partition, gather or
all-reduce them. They are not parameters of the module DeepSpeed wraps; this module gives
them what DeepSpeed gives the dense parameters:

- their own `torch.optim.AdamW` (l3.lr / l3.weight_decay, the dense betas/eps) and the same
  warmup + cosine LambdaLR, stepped right after `engine.step()` at each accumulation
  boundary. Gradients accumulate correctly over micro-batches because DeepSpeed's
  `engine.backward` scales the loss by 1/GAS, and the rows already receive the DP average
  (sharded_l3 scales them by 1/DP);
- gradient clipping by the global norm of a single process, total² = dense² + Σ_ranks rows²
  (`clip_global_norm`): DeepSpeed computes dense from its reduced gradients, then clips with
  a threshold chosen so that its coefficient is max_norm / (total + 1e-6), and the rows are
  scaled by the same coefficient;
- checkpoints: every rank writes `l3_rows_rank{rank:05d}.pt` (rows, AdamW and scheduler
  state, the shard plan) into the checkpoint's staging directory; a resume verifies the plan
  against the model's allocation and the TP×DP layout.

ZeRO stages 0-3 are supported in fp32; in bf16 ZeRO-2 and 3 (DeepSpeed wraps bf16 at stages
0 and 1 in its FP16/BF16 optimizers, whose norm is not exposed before their step: the trainer
refuses that combination in one line).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from l3train.config import Config
from l3train.errors import L3TrainError
from l3train.optim import build_scheduler
from l3train.parallel.shard_plan import ShardPlan
from l3train.parallel.sharded_l3 import ShardedRowAttention

# DeepSpeed clips by dividing by (norm + 1e-6) / threshold; the same epsilon keeps the
# rows' coefficient identical to the one DeepSpeed applies to the dense gradients.
_CLIP_EPS = 1e-6


def rows_file(rank: int) -> str:
    return f"l3_rows_rank{rank:05d}.pt"


class ShardedRows:
    """This rank's L³ rows of every sharded layer, their AdamW and their LR schedule."""

    def __init__(self, attentions: list[ShardedRowAttention], plan: ShardPlan, shard: int, cfg: Config) -> None:
        self.plan, self.shard = plan, shard
        self.params: list[nn.Parameter] = [table for attention in attentions for table in attention.tables()]
        opt = cfg.optimizer
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.l3.lr if cfg.l3.lr is not None else opt.lr,
                                           betas=(opt.beta1, opt.beta2), eps=opt.eps,
                                           weight_decay=cfg.l3.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, cfg)

    def squared_grad_norm(self) -> torch.Tensor:
        """Σ of squared row gradients on this rank (rows without gradient count as zero)."""
        total = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        for param in self.params:
            if param.grad is not None:
                total += param.grad.detach().float().square().sum()
        return total

    def step(self) -> None:
        """AdamW step and LR schedule, then clear the gradients. A shard whose tokens did not
        occur gets a zero gradient, as its rows would in one process (AdamW still moves them)."""
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)

    def state_dict(self) -> dict:
        return {"rows": [param.detach().cpu() for param in self.params], "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "plan": self.plan.state_dict(), "shard": self.shard}

    def save(self, directory: Path, rank: int) -> None:
        torch.save(self.state_dict(), directory / rows_file(rank))

    def load(self, directory: Path, rank: int) -> None:
        """Restore this rank's rows and optimizer state from checkpoint `directory`, refusing a
        checkpoint written for another allocation or another TP×DP layout."""
        path = directory / rows_file(rank)
        if not path.is_file():
            raise L3TrainError(f"cannot resume {directory}: it has no {path.name}; it was written with another "
                               f"TP×DP layout than this run's {self.plan.num_shards} shard(s) of the L³ rows "
                               f"(resharding checkpoints is not supported)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        ShardPlan.from_state_dict(state["plan"], expect_rows_per_token=self.plan.rows_per_token,
                                  expect_num_shards=self.plan.num_shards, source=str(path))
        if state["shard"] != self.shard:
            raise L3TrainError(f"{path} holds shard {state['shard']}, this rank's is {self.shard}")
        if len(state["rows"]) != len(self.params):
            raise L3TrainError(f"{path} holds {len(state['rows'])} row tables, the model has {len(self.params)}")
        with torch.no_grad():
            for param, saved in zip(self.params, state["rows"]):
                if saved.shape != param.shape:
                    raise L3TrainError(f"{path}: a row table of shape {tuple(saved.shape)}, expected "
                                       f"{tuple(param.shape)}; the shard plan does not match this run")
                param.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def check_layout(checkpoint_dir: Path, num_shards: int | None) -> None:
    """Refuse, in one line, a checkpoint whose L³ rows are sharded over another number of ranks
    (`num_shards` None: this run does not shard them)."""
    saved = len(list(checkpoint_dir.glob("l3_rows_rank*.pt")))
    if saved != (num_shards or 0):
        have = f"sharded over {saved} ranks (TP×DP)" if saved else "not sharded"
        want = f"{num_shards} (TP×DP)" if num_shards else "none (one shard)"
        raise L3TrainError(f"cannot resume {checkpoint_dir}: its L³ rows are {have}, this run's shards are {want}; "
                           f"resume with the same TP×DP (resharding checkpoints is not supported)")


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


def clip_global_norm(engine, model: nn.Module, parallel, rows: ShardedRows, max_norm: float) -> float:
    """Make this step's clipping that of one process; returns the global norm before clipping.

    Call at the accumulation boundary between the last `engine.backward` and `engine.step()`.
    total = sqrt(dense² + Σ_ranks rows²) (rows are disjoint over all ranks: a SUM over the
    world). DeepSpeed multiplies the dense gradients by threshold / (dense + 1e-6) when that
    is < 1; with threshold = max_norm·(dense + 1e-6)/(total + 1e-6) this is the single-process
    coefficient max_norm / (total + 1e-6), which the rows get too. The threshold lives in the
    ZeRO optimizers' `clip_grad` and, at ZeRO-0, in the engine config's `gradient_clipping`.
    """
    dense = dense_grad_norm(engine, model, parallel)
    rows_squared = rows.squared_grad_norm()
    dist.all_reduce(rows_squared)
    total = (dense ** 2 + rows_squared.item()) ** 0.5
    if max_norm > 0:
        threshold = max_norm * (dense + _CLIP_EPS) / (total + _CLIP_EPS)
        if hasattr(engine.optimizer, "clip_grad"):
            engine.optimizer.clip_grad = threshold
        else:
            engine._config.gradient_clipping = threshold
        coefficient = max_norm / (total + _CLIP_EPS)
        if coefficient < 1.0:
            for param in rows.params:
                if param.grad is not None:
                    param.grad.mul_(coefficient)
    return total
