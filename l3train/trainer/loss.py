"""The training objective: next-token cross entropy (+ the MoE router losses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from l3train.config import MoEConfig
from l3train.model.llama import ModelOutput
from l3train.model.moe import router_loss


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
            vocab_parallel: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy over unmasked positions, computed in fp32.

    `vocab_parallel`: the logits are this tensor-parallel rank's slice of the vocabulary; the
    loss is then megatron's vocab-parallel cross entropy, whole and equal on every TP rank."""
    if vocab_parallel:
        from l3train.parallel.tensor_parallel import vocab_parallel_token_losses

        losses = vocab_parallel_token_losses(logits, labels).flatten()
    else:
        losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    mask = loss_mask.flatten().to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp_min(1)


def training_loss(output: ModelOutput, lm: torch.Tensor, moe: MoEConfig) -> torch.Tensor:
    """What backward runs on: the LM loss plus the weighted router losses of every MoE block
    (the LM loss alone is what is logged, comparable across dense, L³ and MoE runs)."""
    routing = router_loss(list(output.router.values()), moe)
    return lm if routing is None else lm + routing
