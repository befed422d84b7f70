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

CORPUS=data/corpus/stdlib_docstrings.jsonl
TOKENIZER=data/tokenizer/spm_bpe_2048
INDEXED=data/indexed/stdlib_docstrings_text_document
ALLOCATION=data/allocation/lzw_v32768_k128.npz

[ -f "$CORPUS" ] || $PY tools/build_corpus.py --output "$CORPUS"
[ -f "$TOKENIZER.model" ] || $PY tools/train_tokenizer.py --input "$CORPUS" --output-prefix "$TOKENIZER" \
    --vocab-size 2048 --model-type bpe --max-sentences 200000
[ -f "$INDEXED.idx" ] || $PY tools/preprocess_data.py --input "$CORPUS" --tokenizer "$TOKENIZER.model" \
    --output-prefix "$INDEXED" --workers 2
[ -f "$ALLOCATION" ] || $PY tools/lzw_allocate.py --data-prefix "$INDEXED" --tokenizer "$TOKENIZER.model" \
    --mode lzw --budget 32768 --cap 128 --output "$ALLOCATION"
$PY tools/model_stats.py --config configs/tiny_l3.yaml
$PY -m l3train.train --config configs/tiny_l3.yaml --resume "$@"
