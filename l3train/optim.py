"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from l3train.config import Config
from l3train.model.roles import ParamRole, parameter_roles


def parameter_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Three groups: dense matrices (decayed), vectors such as norms (not decayed), and the
    L³ key/value rows with their own learning rate and weight decay: each row is updated
    only when its token appears, so it typically wants a different step size."""
    l3_rows, decayed, not_decayed = [], [], []
    for _, param, role in parameter_roles(model):
        if not param.requires_grad:
            continue
        if role is ParamRole.L3_ROWS:
            l3_rows.append(param)
        elif role is ParamRole.VECTOR:
            not_decayed.append(param)
        else:
            decayed.append(param)
    opt = cfg.optimizer
    groups = [{"name": "dense", "params": decayed, "weight_decay": opt.weight_decay, "lr": opt.lr},
              {"name": "no_decay", "params": not_decayed, "weight_decay": 0.0, "lr": opt.lr}]
    if l3_rows:
        groups.append({"name": "l3_rows", "params": l3_rows, "weight_decay": cfg.l3.weight_decay,
                       "lr": cfg.l3.lr if cfg.l3.lr is not None else opt.lr})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    return torch.optim.AdamW(parameter_groups(model, cfg), lr=opt.lr, betas=(opt.beta1, opt.beta2),
                             eps=opt.eps, weight_decay=opt.weight_decay)


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
