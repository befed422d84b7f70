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

The trainers train on the GPUs when torch sees any (one per process: NPROC larger than
the visible GPUs is refused), else on the CPU. Environment: OMP_NUM_THREADS defaults to
the CPU cores divided by NPROC; L3TRAIN_PYTHON overrides the interpreter (default: the
repository's .venv, else python3).

When a trainer fails with a user error (one `error: ...` line), that line is printed again
after torchrun's failure report, and the exit status is 2 (else torchrun's).
EOF
}

case "${1:-}" in
  -h | --help) usage; exit 0 ;;
esac
# Argument errors are one `error: ...` line and exit status 2, like the trainer's.
if [ $# -lt 2 ]; then
  echo "error: expected NPROC and CONFIG, got $# argument(s) (usage: launch/local.sh NPROC CONFIG [key.sub=value ...]; see --help)" >&2
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
# The GPUs the trainers will see (l3train.distributed.select_accelerator decides the same way).
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)') \
  || { echo "error: $PYTHON cannot import torch (see above)" >&2; exit 2; }
if [ "$gpus" -gt 0 ] && [ "$NPROC" -gt "$gpus" ]; then
  echo "error: NPROC=$NPROC, but torch sees $gpus GPU(s) on this machine; start at most one process per GPU" >&2
  exit 2
fi
device=cpu
[ "$gpus" -eq 0 ] || device="cuda ($gpus GPU(s) visible)"
threads=$(( $(nproc) / NPROC ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/l3train/torch_extensions}

echo "[local.sh] $NPROC process(es), $device, OMP_NUM_THREADS=$OMP_NUM_THREADS: $CONFIG $*"

# torchrun streams its output live; its stderr is also copied, so that a trainer's one-line
# `error: ...` (printed by every rank) can be repeated after torchrun's failure report.
# shellcheck source=launch/lib.sh
source "$ROOT/launch/lib.sh"
stderr_copy_start
# In the background so that this shell can pass on a SIGTERM; a background command would
# ignore SIGINT and SIGQUIT (and read /dev/null): restore both, and the terminal's stdin.
( trap - INT QUIT; exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
    -m l3train.train --config "$CONFIG" "$@" ) <&0 2>&"$STDERR_COPY_FD" &
torchrun_pid=$!
trap 'kill -s TERM "$torchrun_pid" 2>/dev/null || true' TERM
# The terminal sends Ctrl-C, Ctrl-\ and a hangup to torchrun and the trainers itself: keep waiting.
trap ':' INT QUIT HUP
while :; do
  status=0
  wait "$torchrun_pid" || status=$?
  kill -0 "$torchrun_pid" 2>/dev/null || break
done
stderr_copy_stop
# A trainer's user error: its line last, and its exit status 2 (torchrun reports any failed
# worker as 1), so that scripts can tell a user error from a crash.
if [ "$status" -ne 0 ] && stderr_copy_repeat_errors; then
  exit 2
fi
exit "$status"
