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

# What this script installs is a function of these files (and the torch requirement): when
# they are unchanged since the last successful run and l3train still imports from this tree,
# the second run only checks (below) instead of asking pip to resolve everything again.
STAMP=$("$VENV/bin/python" -c 'import sys; print(sys.prefix)')/.l3train-setup
WANT=$( { cat requirements.txt pyproject.toml; echo "${L3TRAIN_TORCH:-}"; } | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ "$("$VENV/bin/python" -c \
    'import os, l3train; print(os.path.dirname(os.path.dirname(os.path.abspath(l3train.__file__))))' \
    2>/dev/null)" = "$(pwd -P)" ]; then
  echo "[setup] requirements.txt and pyproject.toml unchanged since the last install: nothing to install"
  CHECK=presence
else
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    TORCH_REQ=${L3TRAIN_TORCH:-torch==2.13.0}
    echo "[setup] installing $TORCH_REQ"
    $PIP install "$TORCH_REQ"
  fi
  echo "[setup] installing requirements.txt and l3train (editable)"
  $PIP install -r requirements.txt
  $PIP install --no-deps --no-build-isolation -e .
  [ -n "${PIP_DRY_RUN:-}" ] || echo "$WANT" > "$STAMP"
fi
# After an install, import everything (seconds: torch, DeepSpeed, megatron-core); when nothing
# was installed, the packages the stamp vouches for only need to be present.
L3TRAIN_SETUP_CHECK=${CHECK:-imports} "$VENV/bin/python" - <<'PY'
import os
from importlib.metadata import version

import l3train  # noqa: F401  (silences megatron-core's apex/TE import warnings)
import torch

if os.environ["L3TRAIN_SETUP_CHECK"] == "presence":
    versions = {name: version(name) for name in ("deepspeed", "megatron-core", "sentencepiece", "triton")}
else:
    # DeepSpeed picks its accelerator at import: the one torch can use, unless the caller chose.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed, megatron.core, sentencepiece, triton  # noqa: E401,F401,E402
    versions = {"deepspeed": deepspeed.__version__, "megatron-core": megatron.core.__version__}
print(f"[setup] ok: torch {torch.__version__} (cuda: {torch.cuda.is_available()}), "
      f"deepspeed {versions['deepspeed']}, megatron-core {versions['megatron-core']}")
PY
