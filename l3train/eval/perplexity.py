"""Held-out loss, perplexity and bits per byte of a language model over a text.

The text's token stream (`l3train.eval.data.token_stream`: EOD, then every document) is cut
into consecutive windows of `seq_length` predictions: window i reads stream[iL : iL+L] and
predicts stream[iL+1 : iL+L+1]. Every token after the leading EOD is predicted exactly once,
from the context of its window (non-overlapping windows, as in training).

    loss          = Σ NLL / predicted tokens        (nats; the mean token cross entropy)
    perplexity    = exp(loss)
    bits per byte = Σ NLL / (ln 2 · UTF-8 bytes of the documents)

Perplexity depends on the tokenizer (a token is a different unit for each); bits per byte
does not, so it compares models with different tokenizers on the same text. The bytes are
those of the documents as written when the text is a file (`--text`); the tokenizer
normalises (NFKC, collapsed whitespace), so its round trip can be shorter and would favour
a tokenizer that drops more. An indexed dataset stores tokens only: there the bytes are the
detokenized documents', which `LMResult.bytes_of` says. The detokenized count is kept beside.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from l3train.data.tokenizer import Tokenizer
from l3train.errors import L3TrainError
from l3train.eval.data import EvalText, detokenized_bytes, token_stream


@dataclass
class LMResult:
    """Summed negative log-likelihood over a text and what it is normalised by."""

    nll: float  # nats, summed over the predicted tokens
    tokens: int  # predicted tokens (document tokens and their EODs)
    bytes: int  # UTF-8 bytes of the documents: as written where known, else detokenized (`bytes_of`)
    documents: int
    detokenized_bytes: int  # UTF-8 bytes of the documents' tokens decoded
    bytes_of: str  # "text as written" or "detokenized tokens"

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.bytes)

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "loss": self.loss, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte}


def next_token_nll(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """NLL (fp32, nats) of each of `targets` given the `inputs` before it; both (batch, seq)."""
    logits = model(inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def evaluate_lm(model: nn.Module, text: EvalText, tokenizer: Tokenizer, seq_length: int, batch_size: int = 8,
                progress: bool = True) -> LMResult:
    """Loss, perplexity and bits per byte of `model` on `text` in windows of `seq_length`."""
    max_len = model.cfg.max_seq_len
    if not 1 <= seq_length <= max_len:
        raise L3TrainError(f"--seq-length must be in [1, model.max_seq_len={max_len}], got {seq_length}")
    if batch_size < 1:
        raise L3TrainError(f"--batch-size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    stream = torch.from_numpy(token_stream(text.documents, tokenizer.eod_id))
    predicted = len(stream) - 1
    starts = np.arange(0, predicted, seq_length)
    # Full windows in batches; the shorter last window (if any) on its own, unpadded.
    full = starts[starts + seq_length <= predicted]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [starts[len(full):]] if len(full) < len(starts) else []
    nll = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for group in tqdm(groups, desc="evaluate", unit="batch", disable=None if progress else True):
            length = min(seq_length, predicted - int(group[0]))
            rows = torch.stack([stream[start:start + length + 1] for start in group.tolist()]).to(device)
            nll += next_token_nll(model, rows[:, :-1], rows[:, 1:]).double().sum().cpu()
    decoded = detokenized_bytes(tokenizer, text.documents)
    written = text.text_bytes is not None
    return LMResult(nll=float(nll), tokens=predicted, bytes=text.text_bytes if written else decoded,
                    documents=len(text.documents), detokenized_bytes=decoded,
                    bytes_of="text as written" if written else "detokenized tokens")
