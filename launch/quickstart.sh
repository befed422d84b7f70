#!/usr/bin/env bash
# From a fresh clone to a trained tiny L³ model, on CPU, in minutes:
#   set up .venv → default corpus (Python stdlib docstrings) → sentencepiece tokenizer →
#   Megatron .bin/.idx → LZW allocation → train configs/tiny_l3.yaml.
# Each data step is skipped when its output exists; extra arguments are config overrides
# passed to the trainer (e.g. training.steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
PY=.venv/bin/python
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/l3train/torch_extensions}

# shellcheck source=lib.sh
source launch/lib.sh
build_quickstart_data "$PY" data
$PY tools/model_stats.py --config configs/tiny_l3.yaml
$PY -m l3train.train --config configs/tiny_l3.yaml --resume "$@"
