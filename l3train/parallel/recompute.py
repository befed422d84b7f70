"""Activation recomputation (`training.recompute`): keep a block's input, recompute its inside.

    none     store every activation for backward (fastest)
    blocks   every decoder block and L³ block keeps only its input; backward reruns its
             forward first (saves the activations inside attention, the feed-forward and
             the L³ layer's up-projection, at about one more forward pass of compute)
    l3       only the L³ blocks (their W_up output, d_up wide, is the largest activation
             per position of the model)

Applied from outside like the other wrappers (the model code holds none of it): the
instance's `forward` is replaced by one that runs the original under
`torch.utils.checkpoint` (non-reentrant), so parameter names, hooks and state dicts are
unchanged. Collectives inside a recomputed block (sequence-parallel gathers, the sharded
rows' all-to-all) run again during backward, on every rank in the same order. The
recomputed forward is the same computation, so gradients equal those without recomputation.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from l3train.model.llama import DecoderLM

MODES = ("none", "blocks", "l3")


def _recomputed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _recompute(module: nn.Module) -> None:
    module.forward = functools.partial(_recomputed, module.forward)


def apply_recompute(model: DecoderLM, mode: str) -> None:
    """Make the blocks `mode` selects recompute their activations in backward."""
    if mode not in MODES:
        raise ValueError(f"unknown recompute mode {mode!r}; expected one of {MODES}")
    if mode == "blocks":
        for block in model.blocks:
            _recompute(block)
    if mode in ("blocks", "l3"):
        for block in model.lookups.values():
            _recompute(block)
