"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from l3train.config import Config
from l3train.model.roles import ParamRole, parameter_roles


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
    """AdamW whose next step can be cancelled: DeepSpeed's optimizers (ZeRO 0-3, bf16) call
    the client optimizer's `step()` on the master weights and then copy them to the model, so
    cancelling it here skips a step whose loss or gradient was not finite without touching
    DeepSpeed's bookkeeping (gradients are still cleared, the LR schedule still advances)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.skip_next_step = False

    def step(self, closure=None):
        if self.skip_next_step:
            self.skip_next_step = False
            return None
        return super().step(closure)


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
