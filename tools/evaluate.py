#!/usr/bin/env python
"""Evaluate a checkpoint: held-out loss / perplexity / bits per byte, zero-shot multiple
choice, and L³ diagnostics with the logit lens (docs/evaluation.md).

    lm           loss, perplexity and bits per byte over a text: by default the validation
                 part of the checkpoint's own data (data.prefixes, data.split); or any
                 indexed dataset (--data-prefix, --split-part) or raw text/JSONL (--text)
    mc           accuracy and length-normalised accuracy on a multiple-choice task (JSONL:
                 {"context", "choices", "label"} per line; tools/build_mc_task.py builds one)
    diagnostics  per L³ layer: softmax entropy, top-1 weight, rows used per token, entropy vs
                 d_t; the logit-lens curve; written to --output as diagnostics.json, PNG
                 plots and TensorBoard events (plus the lm figures of the same pass)

CHECKPOINT is a run_dir (its latest checkpoint), a checkpoints/step_* directory or a
consolidated checkpoint; key.sub=value overrides repoint paths of a training checkpoint's
config (e.g. data.tokenizer=PATH).

Examples:

    python tools/evaluate.py lm runs/tiny_l3
    python tools/evaluate.py lm runs/tiny_l3 --text notes.txt --json results/notes.json
    python tools/evaluate.py lm exports/tiny_consolidated --data-prefix data/indexed/other_text_document \\
        --split-part all --max-tokens 200000
    python tools/evaluate.py mc runs/tiny_l3 --task configs/tasks/stdlib_continuation_example.jsonl
    python tools/evaluate.py diagnostics runs/tiny_l3 --output reports/tiny_l3_diagnostics
    .venv/bin/tensorboard --logdir reports/tiny_l3_diagnostics/tensorboard

Results are printed; --json FILE also writes them as JSON. Outputs are written atomically
and never replace existing ones without --overwrite.
"""

from __future__ import annotations

from l3train.errors import run_cli
from l3train.eval.commands import main

if __name__ == "__main__":
    run_cli(lambda: main(usage_text=__doc__))
