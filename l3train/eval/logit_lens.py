"""The logit lens: how far each depth's early-exit prediction is from the model's final one.

After every decoder block, and after every L³ layer, the residual stream h is read out as
if the model ended there: logits = W_out · RMSNorm_final(h). The curve is the mean over
positions of KL(final ‖ early exit) = Σ_v p_final (log p_final − log p_early), in nats; it
is 0 at the last point by construction. The L³ paper reports that the curve drops right
after the L³ layers: the lookup moves the prediction towards the final one.

Hooks read the residual stream from outside the model: a forward hook on every block and
L³ block keeps its output, and one on the output projection compares them with the final
logits of the same forward pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l3train.model.llama import DecoderLM


@dataclass(frozen=True)
class LensPoint:
    """One depth of the curve."""

    name: str  # "block 3" or "L³ after block 3"
    block: int
    after_l3: bool
    kl: float  # mean KL(final ‖ early exit), nats

    def as_dict(self) -> dict:
        return asdict(self)


class LogitLens:
    """Accumulates the curve over the forward passes run inside `with`:

        with LogitLens(model) as lens:
            evaluate_lm(model, text, tokenizer, seq_length)
        curve = lens.result()   # [LensPoint] in forward order
    """

    def __init__(self, model: DecoderLM) -> None:
        self.model = model
        # Forward order: block i, then the L³ layer after it when there is one.
        self.points: list[tuple[str, int, bool, nn.Module]] = []
        for index, block in enumerate(model.blocks):
            self.points.append((f"block {index}", index, False, block))
            if str(index) in model.lookups:
                self.points.append((f"L³ after block {index}", index, True, model.lookups[str(index)]))
        self.kl_sum = torch.zeros(len(self.points), dtype=torch.float64)
        self.positions = 0
        self.hidden: dict[int, Tensor] = {}
        self.handles: list = []

    def __enter__(self) -> "LogitLens":
        for slot, (_, _, _, module) in enumerate(self.points):
            self.handles.append(module.register_forward_hook(self._keep(slot)))
        self.handles.append(self.model.output.register_forward_hook(self._compare))
        return self

    def __exit__(self, *_: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.hidden = [], {}

    def _keep(self, slot: int):
        def hook(_module: nn.Module, _args: tuple, output: tuple[Tensor, object]) -> None:
            self.hidden[slot] = output[0].detach()  # blocks and L³ blocks return (h, stats)
        return hook

    def _compare(self, module: nn.Linear, _args: tuple, output: Tensor) -> None:
        final = output.detach().float().log_softmax(-1)
        probs = final.exp()
        for slot, h in self.hidden.items():
            # F.linear, not `module(...)`: calling the hooked module here would re-enter this hook.
            early = F.linear(self.model.norm(h), module.weight).float().log_softmax(-1)
            self.kl_sum[slot] += (probs * (final - early)).sum(-1).double().sum().cpu()
        self.positions += final.shape[:-1].numel()
        self.hidden = {}

    def result(self) -> list[LensPoint]:
        return [LensPoint(name, block, after_l3, float(self.kl_sum[slot]) / max(self.positions, 1))
                for slot, (name, block, after_l3, _) in enumerate(self.points)]
