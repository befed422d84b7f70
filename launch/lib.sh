# Shell helpers shared by launch/local.sh and launch/slurm/pretrain.sbatch (sourced, not run).
#
# The trainer reports a user error as one stderr line `error: ...` and exit status 2. Under
# torchrun every rank prints that line, and torchrun's ChildFailedError report (a long
# block) follows and buries it; torchrun itself exits 1. So the launchers stream the
# step's stderr live through `tee` into a temporary copy and, when the step fails, print
# the distinct `error: ` lines of that copy again, last, and exit 2:
#
#   stderr_copy_start                          # sets STDERR_COPY_FD; cleans up on EXIT
#   COMMAND 2>&"$STDERR_COPY_FD" &             # stderr reaches the terminal/log and the copy
#   stderr_copy_stop                           # after COMMAND exited: wait until tee has written it all
#   stderr_copy_repeat_errors || ...           # the `error: ` lines again on stderr; fails if none
#
# stderr_copy_start installs an EXIT trap (the scripts sourcing this have none of their own).

_stderr_copy_dir=""
_stderr_copy_tee=""
STDERR_COPY_FD=""

stderr_copy_start() {
  _stderr_copy_dir=$(mktemp -d "${TMPDIR:-/tmp}/l3train-stderr.XXXXXX")
  trap stderr_copy_cleanup EXIT
  mkfifo "$_stderr_copy_dir/fifo"
  # tee ignores stop signals (a terminal's Ctrl-C, scancel's SIGTERM to the whole batch step):
  # it must pass on what torchrun and the trainers print while they shut down, and it ends
  # at end of file, once every writer has closed the pipe.
  ( trap '' INT QUIT TERM HUP USR1 USR2; exec tee "$_stderr_copy_dir/stderr" <"$_stderr_copy_dir/fifo" >&2 ) &
  _stderr_copy_tee=$!
  # Opening the write end here (it waits for tee's read end) means tee always gets its end
  # of file when this shell closes its copy, even if the command never ran.
  exec {STDERR_COPY_FD}>"$_stderr_copy_dir/fifo"
}

# Close this shell's write end and wait until tee has copied everything the command wrote.
stderr_copy_stop() {
  if [ -n "$STDERR_COPY_FD" ]; then
    exec {STDERR_COPY_FD}>&-
    STDERR_COPY_FD=""
  fi
  # A trapped signal interrupts `wait`: wait again until tee has exited.
  while [ -n "$_stderr_copy_tee" ] && kill -0 "$_stderr_copy_tee" 2>/dev/null; do
    wait "$_stderr_copy_tee" 2>/dev/null || true
  done
  _stderr_copy_tee=""
}

# Print the distinct `error: ` lines of the copy (every rank prints the same one) on stderr,
# in order of first appearance; return 1 when there is none.
stderr_copy_repeat_errors() {
  local copy=$_stderr_copy_dir/stderr
  [ -n "$_stderr_copy_dir" ] && grep -q '^error: ' "$copy" 2>/dev/null || return 1
  awk '/^error: / && !seen[$0]++' "$copy" >&2
}

stderr_copy_cleanup() {
  [ -n "$_stderr_copy_dir" ] || return 0
  if [ -n "$STDERR_COPY_FD" ]; then
    exec {STDERR_COPY_FD}>&-
    STDERR_COPY_FD=""
  fi
  rm -rf "$_stderr_copy_dir"
  _stderr_copy_dir=""
}

# build_quickstart_data PYTHON DIR: the quick start's data under DIR (corpus/, tokenizer/,
# indexed/, allocation/: the paths configs/tiny_*.yaml name under data/), each step skipped
# when its output exists. Also used by tools/gpu_kit.sh and tools/gpu_check.sh.
build_quickstart_data() {
  local py=$1 dir=$2
  local corpus=$dir/corpus/stdlib_docstrings.jsonl tokenizer=$dir/tokenizer/spm_bpe_2048
  local indexed=$dir/indexed/stdlib_docstrings_text_document allocation=$dir/allocation/lzw_v32768_k128.npz
  [ -f "$corpus" ] || "$py" tools/build_corpus.py --output "$corpus"
  [ -f "$tokenizer.model" ] || "$py" tools/train_tokenizer.py --input "$corpus" --output-prefix "$tokenizer" \
      --vocab-size 2048 --model-type bpe --max-sentences 200000
  [ -f "$indexed.idx" ] || "$py" tools/preprocess_data.py --input "$corpus" --tokenizer "$tokenizer.model" \
      --output-prefix "$indexed" --workers 2
  [ -f "$allocation" ] || "$py" tools/lzw_allocate.py --data-prefix "$indexed" --tokenizer "$tokenizer.model" \
      --mode lzw --budget 32768 --cap 128 --output "$allocation"
}
