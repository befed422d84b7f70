"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from l3train.config import Config
from l3train.model.roles import ParamRole, parameter_roles
from l3train.row_adamw import row_sparse_adamw_step


GROUP_NAMES = ("dense", "no_decay", "l3_rows")


def named_parameter_groups(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """(group name, [(parameter name, parameter)]) for the non-empty groups, in the order the
    optimizer holds them (checkpoint conversion maps optimizer state by this order): dense
    matrices (decayed), vectors such as norms (not decayed), and the L³ key/value rows with
    their own learning rate and weight decay: each row is updated only when its token
    appears, so it typically wants a different step size."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in GROUP_NAMES}
    for name, param, role in parameter_roles(model):
        if param.requires_grad:
            group = {ParamRole.L3_ROWS: "l3_rows", ParamRole.VECTOR: "no_decay"}.get(role, "dense")
            groups[group].append((name, param))
    return [(group, members) for group, members in groups.items() if members]


def parameter_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """The optimizer's parameter groups (`named_parameter_groups`) with their hyperparameters."""
    return [{"name": group, "params": [param for _, param in members], **group_hyperparameters(group, cfg)}
            for group, members in named_parameter_groups(model)]


def group_hyperparameters(name: str, cfg: Config) -> dict:
    """lr, weight decay, betas and eps of the parameter group `name` under `cfg`."""
    opt = cfg.optimizer
    lr, weight_decay = {"dense": (opt.lr, opt.weight_decay), "no_decay": (opt.lr, 0.0),
                        "l3_rows": (cfg.l3.lr if cfg.l3.lr is not None else opt.lr, cfg.l3.weight_decay)}[name]
    return {"lr": lr, "weight_decay": weight_decay, "betas": (opt.beta1, opt.beta2), "eps": opt.eps}


def apply_hyperparameters(param_groups: list[dict], scheduler: torch.optim.lr_scheduler.LambdaLR,
                          cfg: Config) -> None:
    """After a resume with changed settings: restoring optimizer and scheduler state brought
    back the checkpoint's lr, weight decay, betas and eps; set `cfg`'s, at the restored step
    of the schedule (whose multiplier already follows `cfg`)."""
    settings = [group_hyperparameters(group["name"], cfg) for group in param_groups]
    scheduler.base_lrs = [setting["lr"] for setting in settings]
    for group, setting in zip(param_groups, settings):
        group.update(setting, initial_lr=setting["lr"])
        group["lr"] = setting["lr"] * lr_multiplier(scheduler.last_epoch, cfg)


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next step can be cancelled, and which steps row-sparse gradients too.

    Cancelling: DeepSpeed's optimizers (ZeRO 0-3, bf16) call the client optimizer's `step()`
    on the master weights and then copy them to the model, so cancelling it here skips a step
    whose loss or gradient was not finite without touching DeepSpeed's bookkeeping (gradients
    are still cleared, the LR schedule still advances).

    Row-sparse gradients (the L³ tables' on CPUs, where this optimizer receives them as they
    are: l3train.model.l3_cpu.row_sparse_gradient) take `row_sparse_adamw_step`, AdamW's own
    update of every row on the same state; the dense ones torch's (fused) AdamW."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip_next_step = False

    def step(self, closure=None):
        if self.skip_next_step:
            self.skip_next_step = False
            return None
        sparse = {param: param.grad for group in self.param_groups for param in group["params"]
                  if param.grad is not None and param.grad.is_sparse}
        if not sparse:
            return super().step(closure)
        for param in sparse:
            param.grad = None  # torch's AdamW steps the dense ones, and skips these
        try:
            loss = super().step(closure)
            row_sparse_adamw_step(self, sparse)
        finally:
            for param, grad in sparse.items():
                param.grad = grad  # for whoever clears them (DeepSpeed's engine, zero_grad)
        return loss


def build_optimizer(model: nn.Module, cfg: Config) -> SkippableAdamW:
    """AdamW over `parameter_groups`, fused: one kernel per step over all tensors (on CPU ~5×
    faster than the per-tensor loop on the L³ tables, with identical results), on CUDA too."""
    opt = cfg.optimizer
    return SkippableAdamW(parameter_groups(model, cfg), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                          fused=True,
                          weight_decay=opt.weight_decay)


def lr_multiplier(step: int, cfg: Config) -> float:
    """Linear warmup to 1, then cosine decay to min_lr/lr at the last step."""
    opt, total = cfg.optimizer, cfg.training.steps
    if step < opt.warmup_steps:
        return (step + 1) / opt.warmup_steps
    floor = opt.min_lr / opt.lr if opt.lr > 0 else 0.0
    progress = (step - opt.warmup_steps) / max(1, total - opt.warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
