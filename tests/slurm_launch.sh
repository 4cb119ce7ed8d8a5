#!/usr/bin/env bash
# Usage: slurm_launch.sh <build dir>
# Starts a real single-node SLURM cluster (munged, slurmctld and slurmd from Debian's munge
# and slurm-wlm, with a slurm.conf generated in a temporary folder from this node's
# `slurmd -C` line, no cgroups) and submits launch/slurm/distattn-cpu.sbatch from the
# checkout as the README says: through srun --mpi=pmix, through the launch/mpirun.sh fallback
# (PMIx hidden from `srun --mpi=list`), and twice where it must fail with a message naming
# the variable to set. Checks each job's final state and output (2 ranks, #wrong 0, check
# OK). Stops exactly the daemons it started (by PID) on every exit path.
# Exit 77 (ctest SKIP) when SLURM is not installed (scripts/setup-deps.sh --test installs it)
# or when not run as root (slurmd must be root to start jobs).
# Environment: SLURM_TEST_TIMEOUT (seconds for all jobs to end, default 240),
#   KEEP_SLURM_TMP=1 keeps the temporary folder (configuration, daemon logs, job outputs).
set -euo pipefail

if [ "$#" -ne 1 ]; then
  echo "usage: $0 <build dir>" >&2
  exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$(cd "$1" && pwd)"
TIMEOUT="${SLURM_TEST_TIMEOUT:-240}"

skip() {
  echo "skipped: $*"
  exit 77
}
for tool in munged slurmctld slurmd sbatch scontrol scancel srun; do
  command -v "$tool" >/dev/null 2>&1 ||
    skip "SLURM is not installed ($tool not found; scripts/setup-deps.sh --test installs Debian's slurm-wlm and munge)"
done
[ "$(id -u)" -eq 0 ] || skip "not root (slurmd must run as root to start jobs)"
[ -x "$BUILD/bin/distattn-bench" ] || { echo "FAIL: $BUILD/bin/distattn-bench not built"; exit 1; }

# Jobs inherit the submitting environment: nothing from an outer allocation or the caller's
# distattn settings may leak into them.
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^(SLURM_|DISTATTN_)' || true)
unset BUILD_DIR MPIRUN_ARGS NP

TMP="$(mktemp -d "${TMPDIR:-/tmp}/distattn-slurm.XXXXXX")"
chmod 755 "$TMP" # munged refuses a socket in a folder that others cannot search
DAEMONS=()       # "name:pid", in start order
JOBS=()          # job ids, in submission order
NAMES=()         # job names, same order

alive() { # a started daemon that has not exited (a zombie child counts as exited)
  local state=""
  [ -r "/proc/$1/stat" ] && read -r _ _ state _ <"/proc/$1/stat" 2>/dev/null
  [ -n "$state" ] && [ "$state" != Z ]
}

stop_daemon() { # stop_daemon <name:pid>: SIGTERM, SIGKILL after 10 s, reaped
  local name="${1%%:*}" pid="${1#*:}"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do alive "$pid" || break; sleep 0.2; done
  if alive "$pid"; then
    echo "[slurm_launch] $name (pid $pid) ignored SIGTERM: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  echo "[slurm_launch] stopped $name (pid $pid)"
}

cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  if [ "${#JOBS[@]}" -gt 0 ]; then
    scancel "${JOBS[@]}" >/dev/null 2>&1 || true
    # Let the job steps end before slurmd stops: each slurmstepd keeps a socket in the spool.
    for _ in $(seq 40); do
      [ -n "$(find "$TMP/spool" -type s 2>/dev/null)" ] || break
      sleep 0.5
    done
  fi
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[i]}"; done
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ]; then
    for log in "$TMP"/*.log; do
      [ -f "$log" ] && { echo "--- tail of $log"; tail -n 20 "$log"; }
    done
  fi
  if [ "${KEEP_SLURM_TMP:-0}" = 1 ]; then echo "[slurm_launch] kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_up <seconds> <what> <name:pid> <command...>: polls the command until it succeeds. Fails
# the test when that takes longer than <seconds>; returns 1 at once when the daemon exits
# first or its log says it could not bind its port (another process took it)
wait_up() {
  local limit=$1 what=$2 daemon=$3
  shift 3
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ! alive "${daemon#*:}" || grep -qs 'Unable to bind' "$TMP/${daemon%%:*}.log"; then
      echo "[slurm_launch] ${daemon%%:*} exited or lost its port before $what"
      return 1
    fi
    if [ "$SECONDS" -ge "$end" ]; then
      echo "FAIL: $what not within $limit s"
      exit 1
    fi
    sleep 0.5
  done
}

start() { # start <name> <command...>: in the background, output to $TMP/<name>.out
  local name=$1
  shift
  "$@" >"$TMP/$name.out" 2>&1 </dev/null &
  DAEMONS+=("$name:$!")
  echo "[slurm_launch] started $name (pid $!)"
}

# Two TCP ports for slurmctld and slurmd, below the kernel's ephemeral range (an outgoing
# connection of any process, the MPI tests running beside this one included, may take a port
# inside it at any moment). A port can still be taken between this check and the daemon's
# bind: start_cluster then retries with another pair.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
EPHEMERAL_LOW=32768
read -r EPHEMERAL_LOW _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
PORT_HIGH=$((EPHEMERAL_LOW > 12002 ? EPHEMERAL_LOW - 2 : 40000))
pick_ports() {
  local p
  PORT=""
  for _ in $(seq 100); do
    p=$((10000 + RANDOM % (PORT_HIGH - 10000)))
    if port_free "$p" && port_free "$((p + 1))"; then PORT=$p; return 0; fi
  done
  echo "FAIL: no free pair of TCP ports in 10000-$((PORT_HIGH + 1))"
  exit 1
}

# munge: a fresh key and socket of our own (the system's munged, if any, is left alone).
head -c 1024 /dev/urandom >"$TMP/munge.key"
chmod 600 "$TMP/munge.key"
start munged munged --foreground --socket="$TMP/munge.socket" --key-file="$TMP/munge.key" \
  --log-file="$TMP/munged.log" --pid-file="$TMP/munged.pid" --seed-file="$TMP/munged.seed"
wait_up 20 "munged socket" "${DAEMONS[-1]}" test -S "$TMP/munge.socket" || { echo "FAIL: munged exited"; exit 1; }

NODE_LINE="$(slurmd -C | head -n 1)" # NodeName=<host> CPUs=... RealMemory=...
NODE="$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' <<<"$NODE_LINE")"
CPUS="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$NODE_LINE")"
export SLURM_CONF="$TMP/slurm.conf"
# PMIx's files (spmix_appdir_<uid>_<job>.<step>, /tmp by default) in our folder too, and job
# ids (FirstJobId) unlike another test cluster's running at the same time.
mkdir -p "$TMP/pmix"
echo "PMIxCliTmpDirBase=$TMP/pmix" >"$TMP/mpi.conf"
node_idle() { scontrol show node "$NODE" -o | grep -q 'State=IDLE'; }

start_cluster() { # writes slurm.conf for a fresh pair of ports, starts both daemons
  local attempt
  for attempt in 1 2 3; do
    pick_ports
    rm -rf "$TMP/state" "$TMP/spool"
    mkdir -p "$TMP/state" "$TMP/spool"
    cat >"$SLURM_CONF" <<EOF
ClusterName=distattn-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$TMP/munge.socket
StateSaveLocation=$TMP/state
SlurmdSpoolDir=$TMP/spool
SlurmctldPidFile=$TMP/slurmctld.pid
SlurmdPidFile=$TMP/slurmd.pid
SlurmctldLogFile=$TMP/slurmctld.log
SlurmdLogFile=$TMP/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
KillWait=5
FirstJobId=$((1000 + RANDOM * 1000))
$NODE_LINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    echo "[slurm_launch] $SLURM_CONF: $NODE_LINE, ports $PORT-$((PORT + 1))"
    start slurmctld slurmctld -D -f "$SLURM_CONF"
    if wait_up 30 "slurmctld answering" "${DAEMONS[-1]}" scontrol ping; then
      start slurmd slurmd -D -f "$SLURM_CONF"
      wait_up 60 "node $NODE idle" "${DAEMONS[-1]}" node_idle && return 0
      stop_daemon "${DAEMONS[-1]}"
      unset 'DAEMONS[-1]'
    fi
    stop_daemon "${DAEMONS[-1]}" # slurmctld
    unset 'DAEMONS[-1]'
    grep -h 'error' "$TMP/slurmctld.log" "$TMP/slurmd.log" 2>/dev/null | tail -n 3 || true
    for log in slurmctld slurmd; do
      if [ -f "$TMP/$log.log" ]; then mv "$TMP/$log.log" "$TMP/$log.try$attempt.log"; fi
    done
    echo "[slurm_launch] attempt $attempt: a daemon exited early; again with other ports"
  done
  echo "FAIL: the SLURM daemons did not come up in 3 attempts"
  exit 1
}
start_cluster
up=$SECONDS

# srun without its PMIx plugin, as at a site whose SLURM lacks it: the job must fall back to
# launch/mpirun.sh (mpirun still starts its daemons through this srun).
mkdir -p "$TMP/nopmix"
cat >"$TMP/nopmix/srun" <<EOF
#!/bin/sh
if [ "\$*" = "--mpi=list" ]; then "$(command -v srun)" --mpi=list 2>&1 | grep -v pmix; exit 0; fi
exec "$(command -v srun)" "\$@"
EOF
chmod +x "$TMP/nopmix/srun"

SBATCH_EXTRA=()
if [ "${CPUS:-1}" -lt 2 ]; then SBATCH_EXTRA=(--overcommit); fi # 2 ranks on a 1-core node
submit() { # submit <name> <folder to submit from> [VAR=value ...] -- <template> [arguments]
  local name=$1 dir=$2 id
  shift 2
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  id="$(cd "$dir" && env "${envs[@]}" sbatch --parsable --job-name="$name" \
    --output="$TMP/$name.job.out" "${SBATCH_EXTRA[@]}" "$@")"
  id="${id%%;*}"
  JOBS+=("$id")
  NAMES+=("$name")
  echo "[slurm_launch] submitted $name: job $id"
}

CPU_TEMPLATE=launch/slurm/distattn-cpu.sbatch
RUN=(BUILD_DIR="$BUILD" DISTATTN_VERBOSE=1) # verbose: one placement line per rank
mkdir -p "$TMP/outside" "$TMP/empty"
# The template's default job (comm, every op checked) through srun --mpi=pmix.
submit bench_default_pmix "$REPO" "${RUN[@]}" -- "$CPU_TEMPLATE"
# Every sequence-parallel strategy checked against fp64, through the mpirun fallback; the
# binary named by the first argument, as any other of build/bin would be.
submit bench_sp_mpirun "$REPO" "${RUN[@]}" PATH="$TMP/nopmix:$PATH" -- \
  "$CPU_TEMPLATE" distattn-bench sp --strategy all -b 256 -e 256 --causal -n 1 -w 0 -c
# Disaggregated serving: a prefill group and a decode group on one node, through srun --mpi=pmix,
# every step checked against the single-rank reference.
submit serve_pd "$REPO" "${RUN[@]}" -- "$CPU_TEMPLATE" distattn-serve --prefill-ranks 1 \
  --decode-ranks 1 --requests 4 --rate inf --input-len 32 --output-len 4 --layers 2 --check
# Submitted outside the checkout / with no binary: fail at once, naming what to set.
submit outside_checkout "$TMP/outside" -- "$REPO/$CPU_TEMPLATE"
submit missing_binary "$TMP/outside" DISTATTN_REPO="$REPO" BUILD_DIR="$TMP/empty" -- \
  "$REPO/$CPU_TEMPLATE"

job_state() { scontrol show job -o "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
end=$((SECONDS + TIMEOUT))
for i in "${!JOBS[@]}"; do
  while :; do
    case "$(job_state "${JOBS[i]}")" in
      PENDING | CONFIGURING | RUNNING | COMPLETING | SUSPENDED | REQUEUED | RESIZING | "") ;;
      *) break ;;
    esac
    if [ "$SECONDS" -ge "$end" ]; then
      echo "FAIL: ${NAMES[i]} (job ${JOBS[i]}) did not end within $TIMEOUT s:"
      scontrol show job "${JOBS[i]}" || true
      exit 1
    fi
    sleep 0.5
  done
done
done_at=$SECONDS

fails=0
check_job() { # check_job <name> <final state> <extended regex the output must match>...
  local name=$1 want=$2 i id="" state out pattern
  shift 2
  for i in "${!NAMES[@]}"; do [ "${NAMES[i]}" = "$name" ] && id="${JOBS[i]}"; done
  state="$(job_state "$id")"
  out="$TMP/$name.job.out"
  echo "=== $name (job $id): $state, $(scontrol show job -o "$id" | grep -o 'RunTime=[^ ]*')"
  cat "$out" 2>/dev/null || true
  if [ "$state" != "$want" ]; then
    echo "FAIL: $name ended $state, expected $want"
    fails=$((fails + 1))
  fi
  for pattern in "$@"; do
    if ! grep -qE -- "$pattern" "$out" 2>/dev/null; then
      echo "FAIL: $name output lacks /$pattern/"
      fails=$((fails + 1))
    fi
  done
}
no_wrong() { # comm tables: at least one row, and every row's #wrong (last column) is 0
  awk '$1 ~ /^[0-9]+$/ && NF == 7 { rows++; if ($7 != 0) bad++ }
       END { if (rows == 0 || bad > 0) { printf "FAIL: %d rows, %d with #wrong != 0\n", rows, bad; exit 1 } }' \
    "$TMP/$1.job.out" || fails=$((fails + 1))
}
TWO_RANKS=('^\[distattn\] rank 0/2 local 0/2 ' '^\[distattn\] rank 1/2 local 1/2 ')

check_job bench_default_pmix COMPLETED "${TWO_RANKS[@]}" '^distattn: launcher srun --mpi=pmix$' \
  '^# comm: backend mpi, device cpu, 2 ranks' '^# Out of bounds values : 0 OK$'
no_wrong bench_default_pmix
check_job bench_sp_mpirun COMPLETED "${TWO_RANKS[@]}" '^\[mpirun\.sh\] mpirun -np 2 ' \
  '^# distattn-bench sp: 2 ranks, device cpu' '^# check vs fp64 reference .*: OK$'
check_job serve_pd COMPLETED "${TWO_RANKS[@]}" '^distattn: launcher srun --mpi=pmix$' \
  '^# distattn-serve  world 2 = 1 prefill \+ 1 decode ranks' '^  disagg +1\+1 ' \
  '^# check \(teacher-forced single-rank reference\): OK$'
check_job outside_checkout FAILED "no checkout at $TMP/outside: .*set DISTATTN_REPO"
check_job missing_binary FAILED "$TMP/empty/bin/distattn-bench not found\..*set DISTATTN_REPO"

echo "[slurm_launch] cluster up in $up s, ${#JOBS[@]} jobs ended $((done_at - up)) s later"
if [ "$fails" -ne 0 ]; then
  echo "FAIL: $fails checks failed"
  exit 1
fi
echo "PASS"
