#!/bin/sh
# Usage: fault_injection.sh MPIEXEC BINARY NP EXPECT LIMIT_S FAULT SCENARIO... [-- PATTERN...]
#   [--mpi FLAG...]
# Runs `MPIEXEC -n NP FLAGS BINARY SCENARIO...` with DISTATTN_FAULT=FAULT (and the
# DISTATTN_COMM_TIMEOUT_S of the environment) under `timeout`, then checks how it ended:
#   EXPECT=pass  exit 0 and every rank printed "scenario ... OK" (a delay below the
#                watchdog timeout changes nothing but time)
#   (a scenario that prints "skipped: no GPU" makes the test skip: exit 77)
#   EXPECT=fail  a non-zero exit that is not the outer timeout (the job did not hang), and
#                every PATTERN (grep -E) is in the output (which rank, op and peer failed)
# Both: the job ended within LIMIT_S seconds and left no process of its own behind.
set -u
mpiexec=$1 bin=$2 np=$3 expect=$4 limit=$5 fault=$6
shift 6
scenario=""
while [ $# -gt 0 ] && [ "$1" != "--" ] && [ "$1" != "--mpi" ]; do
  scenario="$scenario $1"
  shift
done
patterns=""
if [ "${1:-}" = "--" ]; then
  shift
  while [ $# -gt 0 ] && [ "$1" != "--mpi" ]; do
    patterns="$patterns
$1"
    shift
  done
fi
[ "${1:-}" = "--mpi" ] && shift
# A tag on the command line of every rank, to find leftovers of this run only.
tag="--tag=fault-$$-$(date +%s%N)"
start=$(date +%s)
# shellcheck disable=SC2086
out=$(DISTATTN_FAULT="$fault" timeout -k 5 120 "$mpiexec" -n "$np" "$@" "$bin" $scenario "$tag" 2>&1)
rc=$?
elapsed=$(($(date +%s) - start))
printf '%s\n' "$out"
echo "[fault] DISTATTN_FAULT='$fault' np=$np scenario:$scenario -> exit $rc after ${elapsed} s"
fail() {
  echo "FAIL: $*"
  exit 1
}
sleep 1
left=$(pgrep -f -- "$tag" || true)
if [ -n "$left" ]; then
  # Ours (the tag is unique to this run): end them so that ctest does not hang on them.
  for pid in $left; do kill -9 "$pid" 2>/dev/null || true; done
  fail "processes left behind: $left"
fi
[ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && fail "the job hung (killed by timeout after 120 s)"
if printf '%s\n' "$out" | grep -q "^skipped: no GPU"; then
  echo "skipped: no GPU"
  exit 77
fi
[ "$elapsed" -le "$limit" ] || fail "the job took $elapsed s (limit $limit s)"
if [ "$expect" = pass ]; then
  [ "$rc" -eq 0 ] || fail "exit code $rc; expected 0 (a fault that must change nothing but time)"
  ok=$(printf '%s\n' "$out" | grep -c "^scenario .* OK on rank")
  [ "$ok" -eq "$np" ] || fail "$ok of $np ranks reported correct results"
  echo "PASS: all $np ranks correct"
  exit 0
fi
[ "$rc" -ne 0 ] || fail "the job exited 0; the injected fault must make it fail"
# Some rank must have said what failed: the fault's own line, or an Error naming op and rank.
printf '%s\n' "$out" | grep -qE "DISTATTN_FAULT: rank|caught Error" || fail "no rank reported the fault"
echo "$patterns" | while IFS= read -r p; do
  [ -z "$p" ] && continue
  printf '%s\n' "$out" | grep -qE -- "$p" || { echo "FAIL: output lacks /$p/"; exit 1; }
done || exit 1
echo "PASS: exit code $rc after ${elapsed} s, every expected message present, nothing left behind"
exit 0
