#!/bin/sh
# Usage: serve_faults.sh <mpiexec> <distattn-serve> [mpiexec flags...]
# distattn-serve under injected faults, 1 prefill + 1 decode rank:
#   1. a prefill rank throwing in one request, a refused request and a dropped completion:
#      the job exits 0, exactly those requests are reported failed with a reason, the others
#      complete, and no page is left behind (the table's "leaked" column is 0);
#   2. a rank that exits in the middle of the run: the job exits non-zero within 60 s;
#   3. a rank that hangs: the others' watchdog (2 s here) ends the job non-zero within 60 s.
# `timeout` guards every run: a hang shows up as exit code 124 and fails the test.
set -u
mpiexec=$1
serve=$2
shift 2
model="--hidden 128 --heads 4 --kv-heads 2 --head-dim 16 --layers 2 --ffn 256 --vocab 256"
load="--requests 6 --input-len 24 --output-len 4 --page-size 4 --kv-pages 64 --no-progress"
fail=0

out=$(timeout 120 "$mpiexec" -n 2 "$@" "$serve" $model $load --check \
  --fault prefill-throw:1 --fault refuse:3 --fault drop-completion:4 \
  --admission-timeout-ms 300 --kv-timeout-ms 500 2>&1)
rc=$?
printf '%s\n' "$out"
[ "$rc" -eq 0 ] || { echo "FAIL: request faults must not fail the job (exit $rc)"; fail=1; }
for want in "request 1 failed: prefill rank 0 failed in layer 0" \
            "request 3 failed: refused by the decode side: no room for" \
            "request 4 failed: decode side: the KV transfer or its completion message did not arrive within 500 ms" \
            "check (teacher-forced single-rank reference): OK"; do
  printf '%s\n' "$out" | grep -qF "$want" || { echo "FAIL: output lacks '$want'"; fail=1; }
done
# The table row: 3 done, 3 failed, 0 leaked.
printf '%s\n' "$out" | grep -E '^  disagg ' | awk '{ if ($5 != 3 || $6 != 3 || $(NF-1) != 0) exit 1 }' ||
  { echo "FAIL: the table must show 3 completed, 3 failed, 0 pages leaked"; fail=1; }

# exit/hang of the decode leader (world rank 1) and a hang of the prefill leader (world rank 0).
for fault in exit:1:2 hang:1:2 hang:0:3; do
  start=$(date +%s)
  out=$(DISTATTN_COMM_TIMEOUT_S=2 timeout 60 "$mpiexec" -n 2 "$@" "$serve" $model $load \
    --fault "$fault" 2>&1)
  rc=$?
  took=$(( $(date +%s) - start ))
  printf '%s\n' "$out" | tail -n 8
  if [ "$rc" -eq 0 ]; then
    echo "FAIL: --fault $fault: the job exited 0"; fail=1
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "FAIL: --fault $fault: the job hung (killed by timeout after 60 s)"; fail=1
  else
    echo "ok: --fault $fault ended the job with exit code $rc in ${took} s"
  fi
done
[ "$fail" -eq 0 ] && echo "PASS"
exit "$fail"
