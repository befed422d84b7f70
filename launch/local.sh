#!/usr/bin/env bash
# Train on this machine with NPROC data-parallel processes (torchrun, single node):
# GPUs when present (one process per GPU), else gloo ranks on the CPU.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local.sh NPROC CONFIG [key.sub=value ...] [--resume] [--exit-after-steps N]

Runs `torchrun --standalone --nproc_per_node NPROC -m l3train.train --config CONFIG ...`;
everything after CONFIG goes to the trainer unchanged (overrides, --resume, ...).
Paths are relative to the current directory, as with the trainer itself.
  launch/local.sh 2 configs/tiny_l3.yaml training.steps=100
  launch/local.sh 2 configs/tiny_l3.yaml --resume        # continue from the latest checkpoint

Environment: DS_ACCELERATOR is set to cpu when no GPU is visible; OMP_NUM_THREADS
defaults to the CPU cores divided by NPROC; L3TRAIN_PYTHON overrides the interpreter
(default: the repository's .venv, else python3).
EOF
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
esac
if [ $# -lt 2 ]; then
  usage >&2
  exit 2
fi
NPROC=$1
CONFIG=$2
shift 2
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "error: NPROC must be a positive integer, got '$NPROC' (see --help)" >&2; exit 2; }
[ -f "$CONFIG" ] || { echo "error: config file $CONFIG not found (see --help)" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${L3TRAIN_PYTHON:-}" ]; then
  PYTHON=$L3TRAIN_PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PYTHON=$ROOT/.venv/bin/python
else
  PYTHON=python3
fi
if ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu
fi
threads=$(( $(nproc) / NPROC ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/l3train/torch_extensions}

echo "[local.sh] $NPROC process(es), ${DS_ACCELERATOR:-cuda}, OMP_NUM_THREADS=$OMP_NUM_THREADS: $CONFIG $*"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  -m l3train.train --config "$CONFIG" "$@"
