#!/bin/sh
# Usage: watchdog_never_joins.sh <mpiexec> <binary> [mpiexec flags...]
# Passes when the 2-rank job where rank 1 never joins exits non-zero within 60 s (not by
# `timeout`: 124) and the output names the watchdog timeout and the abort.
set -u
mpiexec=$1
bin=$2
shift 2
out=$(DISTATTN_COMM_TIMEOUT_S=2 timeout 60 "$mpiexec" -n 2 "$@" "$bin" 2>&1)
rc=$?
printf '%s\n' "$out"
if [ "$rc" -eq 0 ]; then
  echo "FAIL: the job exited 0; a rank that never joins must make it fail"
  exit 1
fi
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "FAIL: the job hung (killed by timeout after 60 s)"
  exit 1
fi
for want in "did not complete within 2.0 s" "aborting the job"; do
  if ! printf '%s\n' "$out" | grep -qF "$want"; then
    echo "FAIL: output lacks '$want'"
    exit 1
  fi
done
echo "PASS: exit code $rc, timeout reported, job aborted"
exit 0
