"""Build the model a config describes, with its L³ allocation checked against the tokenizer."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from l3train.allocation.allocation import Allocation
from l3train.config import Config
from l3train.data.tokenizer import Tokenizer
from l3train.errors import L3TrainError
from l3train.model.l3_layer import deferred_row_tables
from l3train.model.llama import DecoderLM
from l3train.model.roles import ParamRole, parameter_roles


def load_allocation(cfg: Config) -> Allocation | None:
    """The L³ allocation of `cfg` (None for a model without L³ layers), checked against the
    tokenizer and model vocabulary."""
    tokenizer = Tokenizer.load(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise L3TrainError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                           f"vocabulary ({tokenizer.vocab_size}, {cfg.data.tokenizer})")
    if not cfg.l3.after_blocks:
        return None
    return Allocation.load(cfg.l3.allocation, expect_vocab_size=cfg.model.vocab_size,
                           expect_tokenizer_id=tokenizer.tokenizer_id)


def build_model(cfg: Config, defer_rows: bool = False) -> tuple[DecoderLM, Allocation | None]:
    """The plain (unparallelized) DecoderLM of `cfg`, initialised from `training.seed` (the same
    weights on every rank), and its allocation. With `defer_rows` the L³ tables stay on the
    meta device, for a parallel step that creates each rank's own rows (`deferred_row_tables`);
    the other weights are the same either way."""
    allocation = load_allocation(cfg)
    torch.manual_seed(cfg.training.seed)
    rows_per_token = allocation.rows_per_token if allocation else None
    with deferred_row_tables() if defer_rows else contextlib.nullcontext():
        return DecoderLM(cfg.model, cfg.l3, rows_per_token, cfg.moe), allocation


def meta_model(cfg: Config, rows_per_token: np.ndarray | None) -> DecoderLM:
    """The plain model of `cfg` on the meta device: its tensor names, shapes and parameter
    roles without memory or initialisation (checkpoint conversion reads its layout from it)."""
    with torch.device("meta"):
        return DecoderLM(cfg.model, cfg.l3, rows_per_token, cfg.moe)


def names_by_role(model: DecoderLM) -> dict[ParamRole, list[str]]:
    """The model's parameter names grouped by role, each in the model's order (which is the
    order of the rank-local tensors of sharded rows and split experts)."""
    names: dict[ParamRole, list[str]] = {role: [] for role in ParamRole}
    for name, _, role in parameter_roles(model):
        names[role].append(name)
    return names
