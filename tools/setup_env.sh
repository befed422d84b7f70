#!/usr/bin/env bash
# Create .venv with everything l3train needs. Idempotent: a second run only checks.
#
# On a machine without an NVIDIA GPU this installs the CPU build of torch 2.13.0 first
# (so no dependency can pull a multi-GB CUDA build). On a GPU machine, install your CUDA
# build of torch into .venv before running this script, or set L3TRAIN_TORCH to the pip
# requirement to use (e.g. L3TRAIN_TORCH="torch==2.13.0" with your CUDA index configured).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${L3TRAIN_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  TORCH_REQ=${L3TRAIN_TORCH:-torch==2.13.0}
  echo "[setup] installing $TORCH_REQ"
  $PIP install "$TORCH_REQ"
fi
echo "[setup] installing requirements.txt and l3train (editable)"
$PIP install -r requirements.txt
$PIP install --no-deps --no-build-isolation -e .
DS_ACCELERATOR=${DS_ACCELERATOR:-$("$VENV/bin/python" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")} \
  "$VENV/bin/python" - <<'PY'
import l3train  # noqa: F401  (silences megatron-core's apex/TE import warnings)
import torch, deepspeed, megatron.core, sentencepiece, triton  # noqa: F401
print(f"[setup] ok: torch {torch.__version__} (cuda: {torch.cuda.is_available()}), "
      f"deepspeed {deepspeed.__version__}, megatron-core {megatron.core.__version__}")
PY
