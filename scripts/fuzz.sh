#!/usr/bin/env bash
# Runs every libFuzzer harness (fuzz/fuzz_*.cpp) for FUZZ_SECONDS each, starting from its seed
# corpus in fuzz/corpus/<name>/. New inputs go to a working corpus outside the repository
# ($FUZZ_WORK, default $FUZZ_BUILD_DIR/fuzz-work/<name>); a crash is written to
# $FUZZ_WORK/<name>/crash-* and fails the run: copy it to fuzz/regressions/<name>/ (ctest
# replays that folder on every build) and fix the bug.
#   scripts/fuzz.sh                         30 s per harness (what CI runs)
#   FUZZ_SECONDS=14400 scripts/fuzz.sh      4 hours per harness
#   FUZZ_SECONDS=3600 scripts/fuzz.sh fuzz_npy     one harness, one hour
# Environment: FUZZ_BUILD_DIR (an ASan+fuzz build, default <repo>/build-asan; built here if
# missing), FUZZ_SECONDS, FUZZ_JOBS (parallel libFuzzer workers per harness, default 1).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${FUZZ_BUILD_DIR:-$REPO/build-asan}"
SECONDS_EACH="${FUZZ_SECONDS:-30}"
WORK="${FUZZ_WORK:-$BUILD/fuzz-work}"

if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S "$REPO" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
    -DCMAKE_CXX_COMPILER=clang++ -DDISTATTN_CUDA=OFF -DDISTATTN_BUILD_TOOLS=OFF \
    -DDISTATTN_SANITIZE=address -DDISTATTN_FUZZ=ON >/dev/null
fi
harnesses=("$@")
if [ ${#harnesses[@]} -eq 0 ]; then
  for f in "$REPO"/fuzz/fuzz_*.cpp; do harnesses+=("$(basename "$f" .cpp)"); done
fi
cmake --build "$BUILD" --parallel "${JOBS:-2}" $(printf -- '--target %s ' "${harnesses[@]}")

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}"
export LSAN_OPTIONS="${LSAN_OPTIONS:-suppressions=$REPO/tests/sanitizers/lsan.supp}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
export OMP_NUM_THREADS=1
rc=0
for h in "${harnesses[@]}"; do
  mkdir -p "$WORK/$h"
  seeds="$REPO/fuzz/corpus/$h"
  regressions=()
  [ -d "$REPO/fuzz/regressions/$h" ] && regressions=("$REPO/fuzz/regressions/$h")
  log="$WORK/$h.log"
  echo "[fuzz] $h: ${SECONDS_EACH} s (log $log)"
  # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: no allocation blow-ups.
  parallel=()
  if [ "${FUZZ_JOBS:-1}" -gt 1 ]; then parallel=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS"); fi
  if (cd "$WORK/$h" && "$BUILD/bin/$h" -max_total_time="$SECONDS_EACH" -timeout=10 \
      -rss_limit_mb=2048 -print_final_stats=1 "${parallel[@]}" \
      "$WORK/$h" "$seeds" "${regressions[@]}" >"$log" 2>&1); then
    runs=$(cat "$log" "$WORK/$h"/fuzz-*.log 2>/dev/null | grep "stat::number_of_executed_units" |
      awk '{s += $2} END {print s + 0}' || true)
    cov=$(cat "$log" "$WORK/$h"/fuzz-*.log 2>/dev/null | grep -oE "cov: [0-9]+" | tail -1 || true)
    echo "[fuzz] $h: OK, $runs inputs executed, $cov, corpus $(ls "$WORK/$h" | wc -l) files"
  else
    rc=1
    echo "[fuzz] $h: FAILED; the crashing input and report:"
    ls "$WORK/$h"/crash-* "$WORK/$h"/timeout-* "$WORK/$h"/oom-* 2>/dev/null || true
    grep -E "ERROR|runtime error|fuzz_[a-z_]+:|SUMMARY" "$log" | head -20 || true
  fi
done
exit $rc
