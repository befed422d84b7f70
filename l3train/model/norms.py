"""Normalisation layers, using apex's fused kernels when they are installed.

apex is an optional speed-up on CUDA machines; without it (or on CPU) torch's own
RMSNorm/LayerNorm are used. Both compute the same function with the same parameters
(`weight`, plus `bias` for LayerNorm), so checkpoints move freely between the two.
"""

from __future__ import annotations

import torch
from torch import nn

NORM_KINDS = ("rms", "layer")


def _apex_norms() -> tuple[type, type] | None:
    if not torch.cuda.is_available():
        return None
    try:
        from apex.normalization import FusedLayerNorm, FusedRMSNorm
    except ImportError:
        return None
    return FusedRMSNorm, FusedLayerNorm


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """An RMSNorm (`kind="rms"`) or LayerNorm (`kind="layer"`) over the last `dim` features."""
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; expected one of {NORM_KINDS}")
    apex = _apex_norms()
    if kind == "rms":
        return apex[0](dim, eps=eps) if apex else nn.RMSNorm(dim, eps=eps)
    return apex[1](dim, eps=eps) if apex else nn.LayerNorm(dim, eps=eps)
