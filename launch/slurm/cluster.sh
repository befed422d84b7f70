#!/usr/bin/env bash
# A real two-node SLURM cluster (nodes n1 and n2) on this one machine, for the SLURM tests
# and for trying launch/slurm/pretrain.sbatch and launch/sweep.py without a cluster.
#
# Everything lives in one directory: slurm.conf, its own munge key and socket, state,
# spool and logs, on free TCP ports, so it does not touch /etc/slurm or a system munged.
# Clients reach it through SLURM_CONF=<dir>/slurm.conf. `stop` cancels the cluster's jobs
# and ends exactly the daemons `start` launched (their PIDs are in <dir>/pids).
# Needs slurm-wlm and munge (apt-get install -y slurm-wlm munge) and, for slurmd, root.
set -euo pipefail
export PATH=$PATH:/usr/sbin  # the daemons live there; not on every user's PATH

usage() {
  cat <<'EOF'
usage: launch/slurm/cluster.sh start [DIR]
       launch/slurm/cluster.sh stop [--keep] DIR

start  write DIR/slurm.conf (DIR: a new temporary directory unless given; it and its
       parents must be world-searchable, as munged requires), start munged, slurmctld
       and slurmd for n1 and n2, wait until sinfo shows both nodes idle, and print
       SLURM_CONF=DIR/slurm.conf as the last line. Use it as:
           export SLURM_CONF=...; sbatch -N 2 launch/slurm/pretrain.sbatch CONFIG
stop   cancel the cluster's jobs, stop the daemons started by `start` (by PID) and
       remove DIR (--keep leaves it, with the logs in DIR/log).
EOF
}

log() { echo "[cluster] $*" >&2; }
die() { echo "[cluster] error: $*" >&2; exit 1; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Fail with a clear message instead of munged's log line when a parent is not searchable.
check_searchable() {
  local path=$1
  while [ "$path" != "/" ]; do
    [ "$(( $(stat -c '%#a' "$path") & 1 ))" -eq 1 ] \
      || die "$path is not searchable by others (mode $(stat -c %a "$path")); munged refuses such socket paths: pick a DIR under /tmp"
    path=$(dirname "$path")
  done
}

# Start one daemon in the foreground of its own session; record "name pid".
start_daemon() {
  local dir=$1 name=$2
  shift 2
  setsid "$@" </dev/null >>"$dir/log/$name.out" 2>&1 &
  echo "$name $!" >>"$dir/pids"
}

write_conf() {
  local dir=$1 user
  user=$(id -un)
  cat >"$dir/slurm.conf" <<EOF
# Written by launch/slurm/cluster.sh: two nodes on this machine.
ClusterName=l3train
SlurmctldHost=localhost
SlurmctldPort=$(free_port)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
# cred_expire also delays a requeued job's restart (default 120 s).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ReturnToService=2
JobRequeue=1
MinJobAge=600
# Start jobs, and requeued ones once eligible, within ~2 s instead of up to 60 s.
SchedulerParameters=bf_interval=1,sched_interval=2
NodeName=n1 NodeHostname=localhost Port=$(free_port) CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=10000
NodeName=n2 NodeHostname=localhost Port=$(free_port) CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=10000
PartitionName=debug Nodes=n1,n2 Default=YES State=UP MaxTime=INFINITE
EOF
}

wait_idle() {
  local dir=$1 states
  for _ in $(seq 120); do
    states=$(SLURM_CONF="$dir/slurm.conf" sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ')
    [ "$states" = "n1 idle n2 idle " ] && return 0
    sleep 0.5
  done
  log "nodes not idle after 60 s (sinfo: ${states:-no answer}); last log lines:"
  tail -n 5 "$dir"/log/* >&2 || true
  return 1
}

start() {
  local dir=${1:-}
  for command in munged slurmctld slurmd sinfo python3; do
    command -v "$command" >/dev/null || die "$command not found; install with: apt-get install -y slurm-wlm munge"
  done
  if [ -z "$dir" ]; then
    dir=$(mktemp -d "${TMPDIR:-/tmp}/l3train-slurm.XXXXXX")
  fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ ! -e "$dir/pids" ] || die "$dir/pids exists: a cluster may be running there; stop it first"
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool/n1" "$dir/spool/n2" "$dir/log"
  chmod 755 "$dir" "$dir/munge"
  check_searchable "$dir"
  head -c 1024 /dev/urandom >"$dir/munge/munge.key"
  chmod 400 "$dir/munge/munge.key"
  write_conf "$dir"
  : >"$dir/pids"

  log "starting munged, slurmctld, slurmd n1 and n2 in $dir"
  start_daemon "$dir" munged munged -F --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
  for _ in $(seq 50); do [ -S "$dir/munge/munge.socket" ] && break; sleep 0.1; done
  [ -S "$dir/munge/munge.socket" ] || { cat "$dir/log/munged.out" >&2; stop --keep "$dir"; die "munged did not start"; }
  start_daemon "$dir" slurmctld slurmctld -D -c -f "$dir/slurm.conf"
  start_daemon "$dir" slurmd-n1 slurmd -D -N n1 -f "$dir/slurm.conf"
  start_daemon "$dir" slurmd-n2 slurmd -D -N n2 -f "$dir/slurm.conf"
  if ! wait_idle "$dir"; then
    stop --keep "$dir"
    die "cluster did not come up; logs kept in $dir/log"
  fi
  log "nodes n1 and n2 idle"
  echo "SLURM_CONF=$dir/slurm.conf"
}

# Wait up to $2 half-seconds until the cluster at $1 (slurm.conf) has no jobs.
wait_no_jobs() {
  local _
  for _ in $(seq "$2"); do
    [ -z "$(SLURM_CONF=$1 timeout 10 squeue -h -o %i 2>/dev/null || true)" ] && return 0
    sleep 0.5
  done
  return 1
}

any_alive() {
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}

# SIGTERM the named daemons of the cluster in DIR, wait up to 10 s, then SIGKILL.
# Only live processes started with this cluster's paths: never a recycled PID.
terminate() {
  local dir=$1 name pid
  shift
  local -a pids=() names=()
  while read -r name pid; do
    if [[ " $* " == *" $name "* ]] && [ -r "/proc/$pid/cmdline" ] \
        && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$dir/"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
      names+=("$name")
    fi
  done <"$dir/pids"
  for _ in $(seq 100); do
    any_alive "${pids[@]}" || break
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      log "${names[$i]} (${pids[$i]}) ignored SIGTERM for 10 s; killing it"
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    fi
    log "stopped ${names[$i]} (${pids[$i]})"
  done
}

# Cancel the cluster's jobs (letting their steps end), then end our daemons, newest first.
stop() {
  local keep=0 dir
  if [ "${1:-}" = "--keep" ]; then keep=1; shift; fi
  dir=${1:-}
  [ -n "$dir" ] || { usage >&2; exit 2; }
  [ -f "$dir/pids" ] || die "$dir/pids not found: no cluster started there"
  dir=$(cd "$dir" && pwd)  # as recorded in the daemons' command lines
  local conf="$dir/slurm.conf" jobs
  jobs=$(SLURM_CONF=$conf timeout 10 squeue -h -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"
    # shellcheck disable=SC2086
    SLURM_CONF=$conf timeout 10 scancel $jobs || true
    if ! wait_no_jobs "$conf" 60; then
      log "jobs still there after 30 s: killing their processes"
      # shellcheck disable=SC2086
      SLURM_CONF=$conf timeout 10 scancel --full --signal=KILL $jobs || true
      wait_no_jobs "$conf" 20 || log "jobs left: $(SLURM_CONF=$conf squeue -h -o %i | tr '\n' ' ')"
    fi
  fi
  # Slurm daemons together (each takes ~2 s to shut down), then munged, which they use.
  terminate "$dir" slurmctld slurmd-n1 slurmd-n2
  terminate "$dir" munged
  if [ "$keep" -eq 1 ]; then
    mv "$dir/pids" "$dir/pids.stopped"
  else
    rm -rf "$dir"
  fi
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  -h | --help) usage ;;
  *) usage >&2; exit 2 ;;
esac
