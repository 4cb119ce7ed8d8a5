#!/usr/bin/env bash
# Installs missing build dependencies, builds distattn with its tests, and runs the whole
# suite with ctest. Arguments pass through to ctest (e.g. -R ring, -L mpi, -E _np4).
# Environment: BUILD_DIR / BUILD_TYPE / DISTATTN_CUDA / CMAKE_ARGS / JOBS (see build.sh),
# CTEST_JOBS (ctest -j; default: number of cores. Each MPI run counts as np slots
# (PROCESSORS), so multi-rank runs never stack up on a small machine), SKIP_SETUP=1,
# SKIP_BUILD=1.
# GPU tests skip cleanly ("skipped: no GPU") on machines without one.
# --sanitize (first argument, or SANITIZE=1; the default when CI=true, SANITIZE=0 turns it
# off): afterwards also the ASan+UBSan, libFuzzer and TSan stage, scripts/sanitize.sh
# (docs/RELIABILITY.md, "CI budget").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export BUILD_DIR="${BUILD_DIR:-$REPO/build}"
sanitize="${SANITIZE:-0}"
if [ -z "${SANITIZE:-}" ] && [ "${CI:-}" = true ]; then sanitize=1; fi
if [ "${1:-}" = "--sanitize" ]; then
  sanitize=1
  shift
fi

start=$(date +%s)
if [ "${SKIP_SETUP:-0}" != 1 ]; then bash "$REPO/scripts/setup-deps.sh" --test; fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then bash "$REPO/scripts/build.sh"; fi
built=$(date +%s)

CTEST_JOBS="${CTEST_JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"
echo "[test] ctest -j$CTEST_JOBS in $BUILD_DIR${*:+ (args: $*)}"
rc=0
(cd "$BUILD_DIR" && ctest --output-on-failure -j "$CTEST_JOBS" "$@") || rc=$?
end=$(date +%s)
san=""
if [ "$sanitize" = 1 ]; then
  CTEST_JOBS="$CTEST_JOBS" bash "$REPO/scripts/sanitize.sh" || rc=$?
  san=", sanitizers+fuzz $(($(date +%s) - end)) s"
fi
verdict="PASSED"
if [ "$rc" -ne 0 ]; then verdict="FAILED (rc=$rc)"; fi
echo "[test] setup+build $((built - start)) s, tests $((end - built)) s$san: $verdict"
exit "$rc"
