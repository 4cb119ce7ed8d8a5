#!/usr/bin/env bash
# Sanitizer and fuzz stage of the test suite (scripts/test.sh --sanitize, and CI=true):
#   1. ASan+UBSan build with clang and libFuzzer coverage ($ASAN_BUILD_DIR, default
#      <repo>/build-asan; CUDA and distattn-bench off): the unit tests, the fuzz corpus and
#      regression replays, and every MPI test at np 1 and 2 (fault-injection tests included).
#   2. Each libFuzzer harness for FUZZ_SECONDS (default 30) from its seed corpus
#      (scripts/fuzz.sh).
#   3. TSan build ($TSAN_BUILD_DIR, default <repo>/build-tsan; only the threaded targets):
#      communicator, stream, watchdog, runtime, mesh tests at np 1 and 2, 3 fault cases.
# Any sanitizer report fails its test (halt_on_error / a non-zero exit). Suppressions:
# tests/sanitizers/*.supp, for findings inside Open MPI only, each with its reason.
# Environment: JOBS (build jobs), CTEST_JOBS, SANITIZE_STAGES (default "asan fuzz tsan"),
# FUZZ_SECONDS.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASAN_BUILD_DIR="${ASAN_BUILD_DIR:-$REPO/build-asan}"
TSAN_BUILD_DIR="${TSAN_BUILD_DIR:-$REPO/build-tsan}"
STAGES="${SANITIZE_STAGES:-asan fuzz tsan}"
CTEST_JOBS="${CTEST_JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"
SUPP="$REPO/tests/sanitizers"

# clang and its sanitizer/libFuzzer/OpenMP runtimes (Debian), installed on first use.
need=()
for p in clang libclang-rt-14-dev libomp-14-dev; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ "${#need[@]}" -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  echo "[sanitize] installing ${need[*]}"
  "${sudo[@]}" apt-get update && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${need[@]}" || true
fi
command -v clang++ >/dev/null 2>&1 || {
  echo "[sanitize] clang++ not found: install clang, libclang-rt-14-dev and libomp-14-dev" >&2
  exit 1
}

# Reports fail loudly; leaks of Open MPI's own allocations are suppressed (see the file).
# fast_unwind_on_malloc=0: Open MPI is built without frame pointers, and only the slow
# unwinder reaches the Open MPI frames those suppressions match on.
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:fast_unwind_on_malloc=0:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1"
export LSAN_OPTIONS="suppressions=$SUPP/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:suppressions=$SUPP/ubsan.supp"
export TSAN_OPTIONS="suppressions=$SUPP/tsan.supp:halt_on_error=1:second_deadlock_stack=1"

configure() {  # dir, extra cmake args...
  local dir=$1
  shift
  local gen=()
  if command -v ninja >/dev/null 2>&1 && [ ! -f "$dir/CMakeCache.txt" ]; then gen=(-G Ninja); fi
  cmake -S "$REPO" -B "$dir" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DDISTATTN_CUDA=OFF \
    -DDISTATTN_BUILD_TOOLS=OFF "$@" >/dev/null
}

stage_start=$(date +%s)
rc=0
for stage in $STAGES; do
  t0=$(date +%s)
  case $stage in
    asan)
      echo "[sanitize] ASan+UBSan build: $ASAN_BUILD_DIR"
      configure "$ASAN_BUILD_DIR" -DDISTATTN_SANITIZE=address -DDISTATTN_FUZZ=ON
      cmake --build "$ASAN_BUILD_DIR" --parallel "${JOBS:-2}"
      echo "[sanitize] ASan+UBSan: unit tests, fuzz replays, MPI tests at np 1 and 2"
      (cd "$ASAN_BUILD_DIR" &&
        ctest --output-on-failure -j "$CTEST_JOBS" -L "unit|mpi" \
          -E "_np[34]$|install_consumer|^serving_plan$") || rc=1
      # serving_plan makes millions of small allocations, and the slow unwinder that the Open
      # MPI leak suppressions need costs 15x on each (298 s instead of 20 s): it runs with the
      # fast unwinder and without the leak check (whose reports would be Open MPI's, from
      # unloaded components that no suppression can name); the serving code it plans for is
      # leak-checked by serving_np1/np2 above.
      (cd "$ASAN_BUILD_DIR" &&
        ASAN_OPTIONS="${ASAN_OPTIONS/fast_unwind_on_malloc=0/fast_unwind_on_malloc=1}:detect_leaks=0" \
          ctest --output-on-failure -R "^serving_plan$") || rc=1
      ;;
    fuzz)
      echo "[sanitize] libFuzzer: each harness ${FUZZ_SECONDS:-30} s"
      FUZZ_BUILD_DIR="$ASAN_BUILD_DIR" FUZZ_SECONDS="${FUZZ_SECONDS:-30}" \
        bash "$REPO/scripts/fuzz.sh" || rc=1
      ;;
    tsan)
      echo "[sanitize] TSan build (threaded targets only): $TSAN_BUILD_DIR"
      # No AVX-512 kernels: TSan looks for races in comm/core, and ASan covers the kernels.
      configure "$TSAN_BUILD_DIR" -DDISTATTN_SANITIZE=thread -DDISTATTN_AVX512=OFF
      # Kernel tests stay out: LLVM's libomp is not TSan-instrumented, and its thread pool's
      # own allocator shows up as races (ASan covers the kernels).
      targets=(test_comm_base test_stream test_collectives test_watchdog test_runtime test_mesh
        watchdog_never_joins fault_scenarios)
      args=()
      for t in "${targets[@]}"; do args+=(--target "$t"); done
      cmake --build "$TSAN_BUILD_DIR" --parallel "${JOBS:-2}" "${args[@]}"
      # One OpenMP thread (the MPI tests set it too): the threads under test are the
      # communicator's and the tests' own, not libomp's pool.
      echo "[sanitize] TSan: comm, stream, watchdog, runtime, mesh tests at np 1 and 2"
      (cd "$TSAN_BUILD_DIR" && OMP_NUM_THREADS=1 \
        ctest --output-on-failure -j "$CTEST_JOBS" \
          -R "^(comm_base|stream|collectives_np[12]|watchdog_np[12]|runtime_np[12]|mesh_np[12]|watchdog_never_joins_np2|fault_(hang_reduce_scatter|drop_send_recv|delay_send_recv)_np2)$") ||
        rc=1
      ;;
    *)
      echo "[sanitize] unknown stage '$stage' (use asan, fuzz, tsan)" >&2
      exit 2
      ;;
  esac
  echo "[sanitize] stage $stage: $(($(date +%s) - t0)) s"
done
echo "[sanitize] all stages: $(($(date +%s) - stage_start)) s: $([ $rc -eq 0 ] && echo PASSED || echo FAILED)"
exit $rc
