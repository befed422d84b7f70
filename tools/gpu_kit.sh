#!/usr/bin/env bash
# Build, on a machine with a package index, what a GPU machine without one needs to run
# tools/gpu_check.sh: a wheelhouse of exactly the packages its Python lacks, and the quick
# start's data. Prints the call to make there (docs/gpu.md, "A GPU machine without an index").
#
#   tools/gpu_kit.sh [--python-version 3.12] [--kit DIR]
#
# The wheelhouse (DIR/wheelhouse, default DIR gpu_kit/) holds, for CPython --python-version
# on manylinux x86_64: DeepSpeed 0.19.8 built here as a pure-Python wheel (its CUDA ops are
# JIT-built where they are used; l3train uses none on a GPU), megatron-core 0.16.1, pydantic
# with its compiled core and the small packages they import that such an image lacks (the
# list below; tools/gpu_check.sh's preflight imports them all and names any that is still
# missing). Versions are those this project is tested with (.venv). DIR/data is the quick
# start's data (launch/lib.sh build_quickstart_data): corpus, tokenizer, .bin/.idx and LZW
# allocation. Everything is checked against the 64 MiB a run may carry.
set -euo pipefail
cd "$(dirname "$0")/.."

PYVER=3.12
KIT=gpu_kit
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER=${2:?--python-version needs a value, e.g. 3.12}; shift 2 ;;
    --kit) KIT=${2:?--kit needs a directory}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (usage: tools/gpu_kit.sh [--python-version 3.12] [--kit DIR])" >&2; exit 2 ;;
  esac
done
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || { echo "error: --python-version must look like 3.12, got '$PYVER'" >&2; exit 2; }
CARRY_LIMIT_MIB=64

bash tools/setup_env.sh >/dev/null
PY=.venv/bin/python
# What such a machine lacks (deepspeed, megatron-core, pydantic and their imports that are
# not on the GPU image), at the versions installed in .venv.
PACKAGES=(deepspeed megatron-core pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson)
PINS=()
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$name") \
    || { echo "error: $name is not installed in .venv (tools/setup_env.sh installs it)" >&2; exit 1; }
  PINS+=("$name==$version")
done

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/l3train-gpu-kit.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/wheelhouse" "$KIT"
echo "[gpu_kit] building a wheel of ${PINS[0]} (no compiled ops)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$STAGE/wheelhouse" "${PINS[0]}"
echo "[gpu_kit] downloading ${PINS[*]:1} for CPython $PYVER, manylinux x86_64"
"$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$PYVER" \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$STAGE/wheelhouse" "${PINS[@]:1}"

# The data: built once, kept across kit builds (it does not depend on the Python version).
if [ ! -f "$KIT/data/allocation/lzw_v32768_k128.npz" ]; then
  echo "[gpu_kit] building the quick start's data into $KIT/data"
  # shellcheck source=../launch/lib.sh
  source launch/lib.sh
  build_quickstart_data "$PY" "$KIT/data"
fi
rm -rf "$KIT/wheelhouse"
mv "$STAGE/wheelhouse" "$KIT/wheelhouse"

SIZE_KIB=$(du -sk "$KIT/wheelhouse" "$KIT/data" | awk '{ s += $1 } END { print s }')
ls -1 "$KIT/wheelhouse"
echo "[gpu_kit] $KIT: $((SIZE_KIB / 1024)) MiB (wheelhouse and data), limit $CARRY_LIMIT_MIB MiB"
if [ "$SIZE_KIB" -gt $((CARRY_LIMIT_MIB * 1024)) ]; then
  echo "error: $KIT is over the $CARRY_LIMIT_MIB MiB a run may carry" >&2
  exit 1
fi
cat <<EOF
[gpu_kit] the call, from the repository root on the GPU machine (ship $KIT/ beside the tracked tree):
  carry:   ["$KIT/wheelhouse", "$KIT/data"]
  command: bash tools/gpu_check.sh --kit $KIT
EOF
