"""What tools/evaluate.py and the study run: choose the evaluation text, score it with the L³
diagnostics and the logit lens attached, and write the results (JSON, PNG, TensorBoard)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from l3train.config import Config
from l3train.data.tokenizer import Tokenizer
from l3train.eval.data import EvalText, indexed_documents, limit_documents, text_documents
from l3train.eval.diagnostics import L3Diagnostics, LayerDiagnostics
from l3train.eval.logit_lens import LensPoint, LogitLens
from l3train.eval.perplexity import LMResult, evaluate_lm
from l3train.eval.plots import plot_entropy_vs_rows, plot_histograms, plot_logit_lens, write_tensorboard
from l3train.model.llama import DecoderLM
from l3train.utils.atomic import atomic_write_text

DIAGNOSTICS_JSON = "diagnostics.json"
HISTOGRAMS_PNG = "l3_histograms.png"
ENTROPY_VS_ROWS_PNG = "entropy_vs_rows.png"
LOGIT_LENS_PNG = "logit_lens.png"
TENSORBOARD_DIR = "tensorboard"


def evaluation_text(cfg: Config, tokenizer: Tokenizer, prefixes: list[str] | None = None,
                    text: str | os.PathLike | None = None, split: str | None = None, part: str = "valid",
                    fmt: str = "auto", json_key: str = "text", max_tokens: int | None = None) -> EvalText:
    """A raw `text` file if given; else `part` of `split` of the indexed datasets `prefixes`
    (default: the checkpoint config's data.prefixes and data.split, i.e. its validation set)."""
    if text is not None:
        return text_documents(text, tokenizer, fmt, json_key, max_tokens)
    parts = [indexed_documents(prefix, tokenizer, split or cfg.data.split, part)
             for prefix in prefixes or cfg.data.prefixes]
    documents = [doc for piece in parts for doc in piece.documents]
    kept = limit_documents(documents, max_tokens)
    cut = f"; the first {len(kept)} documents (--max-tokens {max_tokens})" if len(kept) < len(documents) else ""
    return EvalText(kept, "; ".join(piece.description for piece in parts) + cut)


@dataclass
class Diagnosed:
    """One pass over a text with everything attached."""

    lm: LMResult
    layers: dict[int, LayerDiagnostics]  # by the block each L³ layer follows; {} for models without L³
    lens: list[LensPoint]

    def record(self) -> dict[str, Any]:
        """JSON-ready: the LM figures, each layer's summary and entropy-by-d_t table, the lens curve."""
        return {"lm": self.lm.as_dict(),
                "l3": {str(block): {**layer.summary(), "entropy_by_rows": layer.entropy_by_rows()}
                       for block, layer in self.layers.items()},
                "logit_lens": [point.as_dict() for point in self.lens]}

    def scalars(self) -> dict[str, float]:
        """TensorBoard scalars: eval/*, l3_diag/block_<b>/*, logit_lens/<depth>_<name>."""
        scalars = {"eval/loss": self.lm.loss, "eval/perplexity": self.lm.perplexity,
                   "eval/bits_per_byte": self.lm.bits_per_byte}
        for block, layer in self.layers.items():
            scalars.update({f"l3_diag/block_{block}/{key}": float(value) for key, value in layer.summary().items()})
        for depth, point in enumerate(self.lens):
            scalars[f"logit_lens/{depth:02d}_{point.name.replace(' ', '_')}"] = point.kl
        return scalars


def diagnose(model: DecoderLM, text: EvalText, tokenizer: Tokenizer, seq_length: int, batch_size: int = 8,
             progress: bool = True) -> Diagnosed:
    """Loss, perplexity and bits per byte of `model` on `text`, with the L³ diagnostics and the
    logit lens of the same forward passes."""
    with L3Diagnostics(model) as diagnostics, LogitLens(model) as lens:
        lm = evaluate_lm(model, text, tokenizer, seq_length, batch_size, progress)
    return Diagnosed(lm, diagnostics.result(), lens.result())


def diagnostics_files(output: Path) -> list[Path]:
    """What `write_diagnostics` writes into `output`."""
    return [output / name for name in (DIAGNOSTICS_JSON, HISTOGRAMS_PNG, ENTROPY_VS_ROWS_PNG, LOGIT_LENS_PNG,
                                       TENSORBOARD_DIR)]


def write_diagnostics(diagnosed: Diagnosed, output: Path, step: int, label: str,
                      about: dict[str, Any]) -> None:
    """diagnostics.json (with `about`: checkpoint, text, ...), the plots (histograms and entropy
    vs d_t only with L³ layers) and TensorBoard scalars and histograms at `step`."""
    output.mkdir(parents=True, exist_ok=True)
    if diagnosed.layers:
        plot_histograms(diagnosed.layers, output / HISTOGRAMS_PNG)
        plot_entropy_vs_rows({f"{label}, L³ after block {block}": layer.entropy_by_rows()
                              for block, layer in diagnosed.layers.items()}, output / ENTROPY_VS_ROWS_PNG)
    plot_logit_lens({label: diagnosed.lens}, output / LOGIT_LENS_PNG)
    histograms: dict[str, np.ndarray] = {}
    for block, layer in diagnosed.layers.items():
        histograms[f"l3_diag/block_{block}/entropy"] = layer.entropy
        histograms[f"l3_diag/block_{block}/top1"] = layer.top1
    write_tensorboard(output / TENSORBOARD_DIR, step, diagnosed.scalars(), histograms)
    atomic_write_text(output / DIAGNOSTICS_JSON, json.dumps({**about, **diagnosed.record()}, indent=2) + "\n")
