#!/usr/bin/env bash
# Check l3train's GPU paths on one GPU within a deadline, as one prepared call: on a GPU
# machine with no package index, the wheels of tools/gpu_kit.sh are installed first.
#
#   tools/gpu_check.sh [--parts P1,P2] [--deadline MIN] [--out DIR] [--kit DIR] [--rehearse]
#
# Python: L3TRAIN_PYTHON, else the repository's .venv, else python3. When that Python cannot
# import deepspeed and megatron-core and KIT/wheelhouse exists (default KIT: gpu_kit), the
# wheelhouse is installed with no index (pip --no-index --no-deps --target KIT/site) and put
# on PYTHONPATH, after the repository itself. The parts, the deadline (default 8 minutes)
# and what is written to --out (default $OUT): python -m l3train.benchmarks.gpu_check --help,
# or this script's --help. docs/gpu.md gives the call for a lent GPU machine.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ -n "${L3TRAIN_PYTHON:-}" ]; then
  PY=$L3TRAIN_PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY=$ROOT/.venv/bin/python
else
  PY=python3
fi
KIT=gpu_kit
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[$i]}" != --kit ] || KIT=${args[$((i + 1))]:-$KIT}
done
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/l3train/torch_extensions}
export L3TRAIN_DATASET_CACHE=${L3TRAIN_DATASET_CACHE:-${TMPDIR:-/tmp}/l3train-gpu-check-datasets}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if ! "$PY" -c 'import deepspeed, megatron.core' >/dev/null 2>&1 && [ -d "$KIT/wheelhouse" ]; then
  SITE=$KIT/site
  if [ ! -f "$SITE/.installed" ]; then
    echo "[gpu_check] installing $KIT/wheelhouse into $SITE (no index)"
    rm -rf "$SITE"
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$SITE" "$KIT"/wheelhouse/*.whl \
      || { echo "error: installing $KIT/wheelhouse failed (see above); rebuild it with tools/gpu_kit.sh" >&2; exit 2; }
    touch "$SITE/.installed"
  fi
  export PYTHONPATH=$PYTHONPATH:$(cd "$SITE" && pwd)
fi
exec "$PY" -m l3train.benchmarks.gpu_check "$@"
