#!/usr/bin/env bash
# Submit the tokenization of a many-file corpus as a SLURM array job of TASKS tasks and its
# merge, which starts when every task has succeeded (launch/slurm/preprocess.sbatch):
#
#   bash launch/slurm/preprocess.sh TASKS --input FILES_DIRS_OR_GLOBS... --tokenizer MODEL \
#        --output-prefix PREFIX [--workers W] [tools/preprocess_data.py options]
#
# Extra sbatch options (partition, account, --cpus-per-task) go in L3TRAIN_SBATCH_ARGS.
# Prints the two job ids.
set -euo pipefail
cd "$(dirname "$0")/../.."
TASKS=${1:-}
if ! [[ "$TASKS" =~ ^[1-9][0-9]*$ ]] || [ $# -lt 2 ]; then
  echo "error: usage: bash launch/slurm/preprocess.sh TASKS --input ... --tokenizer ... --output-prefix ... (TASKS >= 1)" >&2
  exit 2
fi
shift
# shellcheck disable=SC2086  # L3TRAIN_SBATCH_ARGS is a list of words
ARRAY=$(sbatch --parsable ${L3TRAIN_SBATCH_ARGS:-} --array=0-$((TASKS - 1)) launch/slurm/preprocess.sbatch "$@")
ARRAY=${ARRAY%%;*}
# shellcheck disable=SC2086
MERGE=$(sbatch --parsable ${L3TRAIN_SBATCH_ARGS:-} --dependency=afterok:"$ARRAY" launch/slurm/preprocess.sbatch \
  --merge-only "$@")
MERGE=${MERGE%%;*}
echo "submitted array job $ARRAY ($TASKS task(s)) and merge job $MERGE (after all of them succeed)"
echo "ARRAY_JOB=$ARRAY MERGE_JOB=$MERGE"
