#!/usr/bin/env bash
# GPU verification kit for issue 6: run on a machine with an NVIDIA GPU (the device `run`
# tool's H100/H200: CUDA 13, CMake, ninja, g++, Python with PyTorch, compute-sanitizer; no
# network, no Open MPI/Boost/GoogleTest). docs/GPU_RUNBOOK.md gives the exact `run` calls.
#
#   scripts/gpu-verify.sh setup     unpack .gpu-debs (scripts/gpu-deps.sh) into a prefix,
#                                   configure + build build-gpu (CUDA, sm_90a), MPI sanity run
#   scripts/gpu-verify.sh test      ctest -L cuda; the CUDA-core backward cross-check; then
#                                   the rest of the suite while the phase budget lasts
#   scripts/gpu-verify.sh sanitize  compute-sanitizer memcheck / racecheck / synccheck /
#                                   initcheck on the CUDA test binaries
#   scripts/gpu-verify.sh bench     owed benchmarks: device-to-device copy, attn fwd/bwd vs
#                                   PyTorch SDPA (flash, cuDNN), decode vs copy bandwidth,
#                                   MLA decode TP=2, summary vs the issue-6 goals
#   scripts/gpu-verify.sh bench-1m  1,048,576-token causal zigzag, 4 ranks on one GPU
#   scripts/gpu-verify.sh env       print the environment lines the phases use (to `source`)
#   scripts/gpu-verify.sh setup test   several phases in order, sharing one PHASE_BUDGET_S
#
# Every phase: re-runnable (a fresh machine re-runs what setup needs first: each phase calls
# it when the build is missing), bounded (each step under `timeout`, the phase under
# PHASE_BUDGET_S, default 540 s, so a 600 s `run` returns its files), and writes at most 4
# files into $OUT (the tool returns at most 8): <phase>.log, <phase>-summary.json (each
# step's command, exit code and seconds; bench: every benchmark JSON merged in) and per phase
# one or two extra files. Without $OUT (a local try) files go to <repo>/gpu-out/.
#
# Environment (all optional):
#   OUT                  output folder (the run tool sets it)
#   DISTATTN_DEPS_PREFIX where the debs are unpacked (default /opt/distattn-deps)
#   BUILD_DIR            build folder (default <repo>/build-gpu)
#   CUDA_ARCHS           CMAKE_CUDA_ARCHITECTURES (default 90a)
#   JOBS                 ninja -j (default: all cores)
#   PHASE_BUDGET_S       seconds this phase may use in all (default 540)
#   DISTATTN_GPU_DEBS    the debs folder (default <repo>/.gpu-debs)
#   GPU_VERIFY_NO_GPU_OK=1  let setup/test run without a GPU (local proof runs only)
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() {
  sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  exit 2
}
[ $# -ge 1 ] || usage
for p in "$@"; do
  case "$p" in
    setup | test | sanitize | bench | bench-1m | env) ;;
    *) usage ;;
  esac
done

# Several phases in one call: each runs (as its own invocation) in what is left of ONE budget.
if [ $# -gt 1 ]; then
  budget="${PHASE_BUDGET_S:-540}"
  start=$(date +%s)
  rc=0
  for p in "$@"; do
    left=$((budget - ($(date +%s) - start)))
    if [ "$left" -lt 60 ]; then
      echo "[gpu-verify] skipping phase $p: ${left}s of the ${budget}s budget left"
      rc=1
      continue
    fi
    PHASE_BUDGET_S=$left bash "${BASH_SOURCE[0]}" "$p" || rc=1
  done
  exit "$rc"
fi
PHASE="$1"

OUT="${OUT:-$REPO/gpu-out}"
PREFIX="${DISTATTN_DEPS_PREFIX:-/opt/distattn-deps}"
BUILD="${BUILD_DIR:-$REPO/build-gpu}"
DEBS="${DISTATTN_GPU_DEBS:-$REPO/.gpu-debs}"
ARCHS="${CUDA_ARCHS:-90a}"
JOBS="${JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 8)}"
BUDGET="${PHASE_BUDGET_S:-540}"
T0=$(date +%s)
BIN="$BUILD/bin"

if [ "$PHASE" != env ]; then
  mkdir -p "$OUT"
  LOG="$OUT/$PHASE.log"
  WORK="${TMPDIR:-/tmp}/gpu-verify-work"  # scratch outside $OUT (only results travel back)
  mkdir -p "$WORK"
  STEPS="$WORK/$PHASE-steps.tsv"
  : >"$STEPS"
  exec > >(tee -a "$LOG") 2>&1
  TEE_PID=$!
  echo "=== gpu-verify $PHASE: $(date -u +%FT%TZ), repo $REPO, out $OUT, budget ${BUDGET}s"
fi

# pip's cmake/ninja live beside the venv's python3; use them when PATH lacks its own.
if PY3=$(command -v python3 2>/dev/null); then
  for t in cmake ninja; do
    if ! command -v "$t" >/dev/null && [ -x "$(dirname "$PY3")/$t" ]; then
      PATH="$(dirname "$PY3"):$PATH"
    fi
  done
fi

elapsed() { echo $(($(date +%s) - T0)); }
say() { echo "[gpu-verify $PHASE +$(elapsed)s] $*"; }

# step NAME TIMEOUT_S CMD...: runs CMD under `timeout`, shortened to what is left of the phase
# budget; records name, exit code (124 = timed out, -1 = skipped) and seconds. Returns CMD's rc.
step() {
  local name=$1 limit=$2 left rc t
  shift 2
  left=$((BUDGET - $(elapsed) - 15))
  if [ "$left" -lt 20 ]; then
    say "SKIP $name: phase budget spent"
    printf '%s\t%s\t%s\t%s\n' "$name" -1 0 "$*" >>"$STEPS"
    return 125
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "BEGIN $name (limit ${limit}s): $*"
  t=$(date +%s)
  if [ "$(type -t "$1")" = function ]; then
    "$@" # a shell function (it bounds its own commands)
  else
    timeout --kill-after=10 "$limit" "$@" </dev/null
  fi
  rc=$?
  t=$(($(date +%s) - t))
  if [ "$rc" -eq 124 ]; then say "TIMEOUT $name after ${t}s"; else say "END $name rc=$rc ${t}s"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$t" "$*" >>"$STEPS"
  return "$rc"
}

# ---- environment --------------------------------------------------------------------------
U="$PREFIX/usr"
L="$U/lib/x86_64-linux-gnu"
ENV_FILE="$PREFIX/env.sh"

# Lines that put the relocated Open MPI, Boost, GoogleTest (and NCCL when found) in reach.
write_env() {
  local nccl_lib=$1 single_copy=$2
  cat >"$ENV_FILE" <<EOF
# written by scripts/gpu-verify.sh setup $(date -u +%FT%TZ)
export OPAL_PREFIX="$U"                   # relocated Open MPI (Debian's prefix is /usr)
export OPAL_SYSCONFDIR="$PREFIX/etc/openmpi"
# PMIx 4.2 does not relocate with an environment prefix: point it at its plugins (zlib
# pcompress, prm) directly, or mpirun prints "help-pcompress.txt: No such file".
export PMIX_MCA_mca_base_component_path="$L/pmix2/lib/pmix"
export PATH="$PREFIX/bin:\$PATH"
DISTATTN_DEPS_LD="$L:$L/openmpi/lib:$L/pmix2/lib:$PREFIX/fallback-lib${nccl_lib:+:$nccl_lib}"
export LD_LIBRARY_PATH="\$DISTATTN_DEPS_LD\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# One node, no network: shared memory only; never probe InfiniBand/UCX/libfabric.
export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader OMPI_MCA_osc=^ucx OMPI_MCA_plm=isolated
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_hwloc_base_binding_policy=none
export OMPI_MCA_btl_vader_single_copy_mechanism=$single_copy
# For CMake runs inside the tests (install_consumer): the same MPI, Boost and GTest.
export MPI_HOME="$PREFIX" CMAKE_PREFIX_PATH="$U:$L/cmake\${CMAKE_PREFIX_PATH:+:\$CMAKE_PREFIX_PATH}"
EOF
}

# (grep reads a captured string: `cmd | grep -q` under pipefail fails when grep exits first.)
have_gpu() { command -v nvidia-smi >/dev/null && grep -q GPU <<<"$(nvidia-smi -L 2>/dev/null)"; }
SYSLIBS="$(ldconfig -p 2>/dev/null)"

find_nvcc() {
  local c
  for c in "${CUDACXX:-}" "$(command -v nvcc 2>/dev/null)" /usr/local/cuda/bin/nvcc; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

# NCCL: (1) the CUDA toolkit's or the system's nccl.h + libnccl.so: CMake finds them itself;
# (2) pip's nvidia-nccl-cu13 (torch's venv): its libnccl.so.2 through a libnccl.so link in the
# prefix, with its own nccl.h or else the one gpu-deps.sh copied; (3) none: build without.
# Prints "include_dir<TAB>library<TAB>runtime_lib_dir" for case (2), nothing otherwise.
find_nccl() {
  local cuda_inc=$1 d site lib inc
  for d in "$cuda_inc" /usr/include /usr/local/include; do
    if [ -f "$d/nccl.h" ] && { grep -q 'libnccl\.so ' <<<"$SYSLIBS" ||
      ls "$(dirname "$d")"/lib*/libnccl.so "$(dirname "$d")"/lib/x86_64-linux-gnu/libnccl.so \
        >/dev/null 2>&1; }; then
      say "NCCL: system nccl.h in $d (CMake finds it)" >&2
      return 0
    fi
  done
  command -v python3 >/dev/null || return 0
  local py='import site; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))'
  for site in $(python3 -c "$py" 2>/dev/null); do
    lib="$site/nvidia/nccl/lib/libnccl.so.2"
    [ -f "$lib" ] || continue
    inc="$site/nvidia/nccl/include"
    [ -f "$inc/nccl.h" ] || inc="$DEBS/nccl/include"
    if [ ! -f "$inc/nccl.h" ]; then
      say "NCCL: $lib found but no nccl.h (gpu-deps.sh carries one): building without NCCL" >&2
      return 0
    fi
    mkdir -p "$PREFIX/nccl/lib"
    ln -sfn "$lib" "$PREFIX/nccl/lib/libnccl.so"
    ln -sfn "$lib" "$PREFIX/nccl/lib/libnccl.so.2"
    say "NCCL: pip's $lib with header $inc/nccl.h" >&2
    printf '%s\t%s\t%s\n' "$inc" "$PREFIX/nccl/lib/libnccl.so" "$(dirname "$lib")"
    return 0
  done
  say "NCCL: none found: the build goes on without the NCCL backend" >&2
}

# deb_extract FILE DIR: `dpkg -x`, or (no dpkg on that machine) the data archive via ar + tar.
deb_extract() {
  local f=$1 dest=$2 data
  if command -v dpkg >/dev/null && [ "${GPU_VERIFY_NO_DPKG:-0}" != 1 ]; then
    dpkg -x "$f" "$dest"
    return
  fi
  data=$(ar t "$f" | grep '^data\.tar') || return 1
  case "$data" in
    *.xz) ar p "$f" "$data" | tar -xJ -C "$dest" ;;
    *.zst) ar p "$f" "$data" | tar --zstd -x -C "$dest" ;;
    *.gz) ar p "$f" "$data" | tar -xz -C "$dest" ;;
    *) ar p "$f" "$data" | tar -x -C "$dest" ;;
  esac
}

unpack_debs() {
  local stamp="$PREFIX/.unpacked" want
  [ -f "$DEBS/MANIFEST.txt" ] || {
    say "no $DEBS/MANIFEST.txt: run scripts/gpu-deps.sh on a machine with internet and name" \
      ".gpu-debs in the run's carry"
    return 1
  }
  want=$(grep -v '^#' "$DEBS/MANIFEST.txt" | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "debs already unpacked in $PREFIX ($want)"
    return 0
  fi
  case "$(readlink -m "$PREFIX")" in
    / | /usr | /usr/local | /opt | /tmp | "$HOME")
      say "refusing DISTATTN_DEPS_PREFIX=$PREFIX: it is emptied first; name a folder of its own"
      return 1
      ;;
  esac
  rm -rf "$PREFIX"
  mkdir -p "$PREFIX/bin" "$PREFIX/fallback" "$PREFIX/fallback-lib"
  local f pkg n=0
  for f in $(grep -v '^#' "$DEBS/MANIFEST.txt"); do
    pkg=${f%%_*}
    if grep -qxF "$pkg" "$DEBS/fallback-packages.txt"; then
      deb_extract "$DEBS/$f" "$PREFIX/fallback" || return 1
    else
      deb_extract "$DEBS/$f" "$PREFIX" || return 1
    fi
    n=$((n + 1))
  done
  # Generic libraries: only those whose soname this machine lacks (never shadow its own).
  local so base
  while IFS= read -r so; do
    base=$(basename "$so")
    if grep -q "^[[:space:]]*$base " <<<"$SYSLIBS"; then
      say "fallback $base: the system has it"
    else
      cp -L "$so" "$PREFIX/fallback-lib/$base" # the file, not a link into fallback/
      say "fallback $base: taken from the debs"
    fi
  done < <(find "$PREFIX/fallback" -name 'lib*.so.*' \( -type f -o -type l \) |
    grep -E '\.so\.[0-9]+$')
  # Debian creates mpicc/mpirun with update-alternatives, which `dpkg -x` does not run.
  for n2 in mpicc mpicxx mpic++; do ln -sfn "$U/bin/opal_wrapper" "$PREFIX/bin/$n2"; done
  for n2 in mpirun mpiexec; do ln -sfn "$U/bin/orterun" "$PREFIX/bin/$n2"; done
  # The wrapper finds <name>-wrapper-data.txt by argv[0]; Debian ships them as *.openmpi too.
  echo "$want" >"$stamp"
  say "unpacked $n debs into $PREFIX ($(du -sh "$PREFIX" | cut -f1))"
}

# configure_and_build [TARGET...]: configure, then build TARGETs (default: everything).
configure_and_build() {
  local targets=("$@")
  local nvcc cuda_inc nccl cmake_nccl=() extra=()
  nvcc=$(find_nvcc) || { say "no nvcc found"; return 1; }
  cuda_inc="$(dirname "$(dirname "$(readlink -f "$nvcc")")")/include"
  nccl=$(find_nccl "$cuda_inc")
  local nccl_rt=""
  if [ -n "$nccl" ]; then
    IFS=$'\t' read -r inc lib nccl_rt <<<"$nccl"
    cmake_nccl=(-DNCCL_INCLUDE_DIR="$inc" -DNCCL_LIBRARY="$lib")
  fi
  write_env "$nccl_rt" "${SINGLE_COPY:-cma}"
  # shellcheck disable=SC1090 # written just above
  . "$ENV_FILE"
  [ -n "${CMAKE_ARGS:-}" ] && read -r -a extra <<<"$CMAKE_ARGS"
  step cmake-configure 300 cmake -S "$REPO" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DDISTATTN_CUDA=ON -DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" \
    -DMPI_C_COMPILER="$PREFIX/bin/mpicc" -DMPI_CXX_COMPILER="$PREFIX/bin/mpicxx" \
    -DMPIEXEC_EXECUTABLE="$PREFIX/bin/mpirun" \
    -DCMAKE_PREFIX_PATH="$U;$L/cmake" -DBoost_DIR="$L/cmake/Boost-1.74.0" \
    -DGTest_DIR="$L/cmake/GTest" -DBoost_NO_SYSTEM_PATHS=ON "${cmake_nccl[@]}" "${extra[@]}" ||
    return 1
  # Which MPI/Boost/GTest/NCCL the cache picked (the prefix, not a system copy).
  local keys='MPI_CXX_COMPILER|MPI_CXX_HEADER_DIR|MPI_mpi_LIBRARY|MPIEXEC_EXECUTABLE|Boost_DIR'
  keys+='|boost_program_options_DIR|GTest_DIR|NCCL_INCLUDE_DIR|NCCL_LIBRARY|CMAKE_CUDA_COMPILER'
  keys+='|CMAKE_CUDA_ARCHITECTURES'
  grep -E "^($keys)[:=]" "$BUILD/CMakeCache.txt" | sed 's/^/  cache: /'
  step build "${BUILD_TIMEOUT_S:-480}" ninja -C "$BUILD" -j "$JOBS" "${targets[@]}"
}

# The relocated Open MPI across 2 ranks, 64 MiB messages: shared memory with CMA single copy
# (fast); if that fails (CMA refused by the kernel), the copy-in/copy-out fallback.
mpi_sanity() {
  # shellcheck disable=SC2054 # the comma list is one --op argument
  local cmd=("$PREFIX/bin/mpirun" -np 2 "$BIN/distattn-bench" comm --op all_reduce,all_gather
    -b 1K -e 64M -f 16 -n 1 -w 0 -d fp32)
  if step mpi-sanity-cma 90 env OMP_NUM_THREADS=1 "${cmd[@]}"; then
    return 0
  fi
  say "MPI with CMA single copy failed: retrying with btl_vader_single_copy_mechanism=none"
  export OMPI_MCA_btl_vader_single_copy_mechanism=none
  sed -i 's/single_copy_mechanism=.*/single_copy_mechanism=none/' "$ENV_FILE"
  step mpi-sanity-nocma 90 env OMP_NUM_THREADS=1 "${cmd[@]}"
}

machine_info() {
  say "machine:"
  (
    . /etc/os-release 2>/dev/null && echo "  os: ${PRETTY_NAME:-?}"
    echo "  kernel: $(uname -r), cores: $(getconf _NPROCESSORS_ONLN)," \
      "$(free -g | awk '/Mem:/ {print $2 " GiB RAM"}')"
    echo "  g++: $(g++ --version 2>/dev/null | head -n 1)"
    echo "  cmake: $(cmake --version 2>/dev/null | head -n 1), ninja $(ninja --version 2>/dev/null)"
    echo "  nvcc: $($(find_nvcc) --version 2>/dev/null | tail -n 2 | head -n 1)"
    local py='import torch, sys; print(sys.version.split()[0], "torch", torch.__version__)'
    echo "  python3: $(command -v python3) $(python3 -c "$py" 2>/dev/null)"
    echo "  compute-sanitizer: $(command -v compute-sanitizer ||
      ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu \
      --format=csv 2>/dev/null | sed 's/^/  /'
  )
}

# ensure_built [TARGET...]: what a later phase needs (default: everything), set up first where
# missing (a fresh machine: the device tool keeps a machine warm only ~30 s between calls, so
# only the phase's own targets are built then, to save device time).
ensure_built() {
  if [ -f "$ENV_FILE" ] && [ -f "$BUILD/build.ninja" ] && [ -f "$PREFIX/.unpacked" ]; then
    # shellcheck disable=SC1090 # written by setup
    . "$ENV_FILE"
    # Rebuild what changed (a no-op when nothing did).
    step build 420 ninja -C "$BUILD" -j "$JOBS" "$@" || return 1
    return 0
  fi
  say "no build on this machine (a fresh one): setting up first${*:+, building only $*}"
  unpack_debs && configure_and_build "$@" && mpi_sanity
}

# The gtest binaries of tests/cuda (the glob CMake uses).
cuda_test_targets() {
  local t
  for t in "$REPO"/tests/cuda/test_*.cpp; do basename "$t" .cpp; done
}

summary_json() {
  local file=$1
  shift
  python3 - "$STEPS" "$file" "$PHASE" "$(elapsed)" "$@" <<'EOF'
import json, os, sys
steps_path, out, phase, seconds = sys.argv[1:5]
extra = sys.argv[5:]
steps = []
for line in open(steps_path):
    name, rc, t, cmd = line.rstrip("\n").split("\t", 3)
    rc = int(rc)
    steps.append({"step": name, "rc": rc, "seconds": int(t), "command": cmd,
                  "status": "skipped" if rc == -1 else "timeout" if rc in (124, 137)
                  else "ok" if rc == 0 else "failed"})
doc = {"phase": phase, "seconds": int(seconds), "steps": steps}
for path in extra:  # benchmark JSON files, merged under their base names
    try:
        doc.setdefault("results", {})[os.path.basename(path)] = json.load(open(path))
    except Exception as e:  # noqa: BLE001 - record why a result is missing
        doc.setdefault("missing", {})[os.path.basename(path)] = str(e)
json.dump(doc, open(out, "w"), indent=1)
bad = [s["step"] for s in steps if s["status"] != "ok"]
print(f"[gpu-verify {phase}] {len(steps)} steps, {int(seconds)} s; not ok: {bad or 'none'}")
EOF
}

require_gpu() {
  if ! have_gpu && [ "${GPU_VERIFY_NO_GPU_OK:-0}" != 1 ]; then
    say "no GPU visible (nvidia-smi -L): this phase needs one"
    return 1
  fi
}

# ---- phases ---------------------------------------------------------------------------------
phase_setup() {
  machine_info
  have_gpu || say "warning: no GPU visible; setup still builds"
  step unpack-debs 180 unpack_debs || return 1
  configure_and_build || return 1
  mpi_sanity
  # One CUDA test at one rank as a smoke check that binaries start and see the GPU (a skip
  # would pass silently: look for it).
  if have_gpu; then
    step smoke-cuda-attention 120 \
      bash -c 'set -o pipefail; "$@" 2>&1 | tee "'"$WORK"'/smoke.out"' _ \
      "$PREFIX/bin/mpirun" -np 1 "$BIN/test_cuda_attention" \
      --gtest_filter='*ForwardMatchesReferenceEveryDtypeAndMask*'
    if grep -q 'skipped: no GPU' "$WORK/smoke.out" 2>/dev/null; then
      say "FAILED: test_cuda_attention skipped ('no GPU') although nvidia-smi lists one"
      printf '%s\t%s\t%s\t%s\n' smoke-saw-the-gpu 1 0 "test_cuda_attention skipped" >>"$STEPS"
    fi
  fi
}

# GPU tests pass (exit 0) when they skip. With a GPU here, "skipped: no GPU" means a binary
# did not see it: count those as a failed step. Skips that need more GPUs than one (NCCL at
# 2+ ranks) are expected and only listed.
skip_audit() {
  local xml=$1 reasons nogpu
  [ -f "$xml" ] || return 0
  reasons=$(grep -o 'skipped: [^<]*' "$xml" | sed 's/[[:space:]]*$//' | sort | uniq -c)
  say "skip reasons in $(basename "$xml"):"
  echo "${reasons:-  (none)}"
  nogpu=$(grep -cE 'skipped: no GPU( \(or a build without CUDA\))?[[:space:]]*$' "$xml")
  if have_gpu; then
    printf '%s\t%s\t%s\t%s\n' cuda-tests-saw-the-gpu "$([ "$nogpu" -eq 0 ] && echo 0 || echo 1)" 0 \
      "$nogpu test outputs say 'skipped: no GPU' although nvidia-smi lists one" >>"$STEPS"
    [ "$nogpu" -eq 0 ] || say "FAILED: $nogpu test outputs say 'skipped: no GPU' with a GPU present"
  fi
}

phase_test() {
  export GTEST_COLOR=no
  require_gpu || return 1
  ensure_built || return 1
  local stop
  nvidia-smi -L 2>/dev/null
  # GPU tests: np 1, 2, 4 on one GPU. PROCESSORS makes ctest count np slots.
  step ctest-cuda 300 ctest --test-dir "$BUILD" -L cuda --output-on-failure -j 4 \
    --timeout 240 --output-junit "$OUT/ctest-cuda.xml"
  skip_audit "$OUT/ctest-cuda.xml"
  # The CUDA-core backward everywhere (cross-check of the two backward paths).
  step ctest-cuda-simt-backward 150 env DISTATTN_CUDA_BACKWARD=simt ctest --test-dir "$BUILD" \
    -R 'cuda_attention|sp_cuda' --output-on-failure -j 4 --timeout 120
  # The rest of the suite (CPU, MPI) with what is left of the budget.
  local left=$((BUDGET - $(elapsed) - 30))
  if [ "$left" -gt 60 ]; then
    stop=$(date -d "@$(($(date +%s) + left - 10))" +%H:%M:%S)
    step ctest-rest "$left" ctest --test-dir "$BUILD" -LE cuda --output-on-failure \
      -j "$JOBS" --timeout 300 --stop-time "$stop" --output-junit "$OUT/ctest-rest.xml"
  else
    say "SKIP ctest-rest: ${left}s left"
    printf '%s\t%s\t%s\t%s\n' ctest-rest -1 0 "ctest -LE cuda" >>"$STEPS"
  fi
}

phase_sanitize() {
  require_gpu || return 1
  mapfile -t targets < <(cuda_test_targets)
  ensure_built "${targets[@]}" distattn-bench || return 1
  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1)
  [ -x "$cs" ] || { say "compute-sanitizer not found"; return 1; }
  local bins=() t
  for t in "$REPO"/tests/cuda/test_*.cpp; do
    t=$(basename "$t" .cpp)
    [ -x "$BIN/$t" ] && bins+=("$t")
  done
  say "CUDA test binaries: ${bins[*]}"
  # memcheck on every binary; then racecheck (shared-memory hazards), synccheck (barriers)
  # and initcheck (reads of unwritten device memory) on the kernel-heavy ones, most telling
  # first: steps that no longer fit the budget are reported as skipped. One rank each
  # (mpirun -np 1: no singleton daemon under the sanitizer); --error-exitcode makes any
  # reported hazard fail the step.
  local csargs=(--error-exitcode 17 --print-limit 50 --target-processes all)
  local order=(test_cuda_attention test_cuda_mla)
  for t in "${bins[@]}"; do
    case " ${order[*]} " in *" $t "*) ;; *) order+=("$t") ;; esac
  done
  for t in "${order[@]}"; do
    [ -x "$BIN/$t" ] || continue
    step "memcheck-$t" 180 "$PREFIX/bin/mpirun" -np 1 "$cs" --tool memcheck "${csargs[@]}" "$BIN/$t"
  done
  local tool
  for tool in racecheck synccheck initcheck; do
    for t in test_cuda_attention test_cuda_mla; do
      [ -x "$BIN/$t" ] || continue
      step "$tool-$t" 180 "$PREFIX/bin/mpirun" -np 1 "$cs" --tool "$tool" "${csargs[@]}" "$BIN/$t"
    done
  done
  # The device-buffer MPI path at 2 ranks under memcheck (staging through host).
  if [ -x "$BIN/test_mpi_device_buffers" ]; then
    step memcheck-mpi-device-buffers-np2 120 "$PREFIX/bin/mpirun" -np 2 "$cs" --tool memcheck \
      "${csargs[@]}" "$BIN/test_mpi_device_buffers"
  fi
}

# Device-to-device copy bandwidth (bytes read + written), the decode goal's yardstick:
# PyTorch when present, else a small CUDA program built here.
copy_bandwidth() {
  local json=$1
  if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    python3 - "$json" <<'EOF'
import json, sys, torch
n = 1 << 30  # 1 GiB per buffer
a = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
torch.cuda.synchronize()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
iters = 20
s.record()
for _ in range(iters):
    b.copy_(a)
e.record()
torch.cuda.synchronize()
ms = s.elapsed_time(e) / iters
gbps = 2 * n / ms / 1e6
assert torch.equal(a[:1 << 20], b[:1 << 20])
print(f"# device-to-device copy: {n >> 20} MiB in {ms:.3f} ms = {gbps:.0f} GB/s (read + write)")
json.dump({"device": torch.cuda.get_device_name(), "bytes_per_copy": n, "ms": ms,
           "gbps_read_plus_write": gbps, "tool": "torch " + torch.__version__},
          open(sys.argv[1], "w"), indent=1)
EOF
    return $?
  fi
  local src=/tmp/distattn_copy_bw.cu
  cat >"$src" <<'EOF'
#include <cstdio>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
  std::printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)
int main(int argc, char** argv) {
  const size_t n = size_t(1) << 30;
  void *a, *b;
  CK(cudaMalloc(&a, n)); CK(cudaMalloc(&b, n));
  CK(cudaMemset(a, 0x5a, n));
  for (int i = 0; i < 3; ++i) CK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
  cudaEvent_t s, e; CK(cudaEventCreate(&s)); CK(cudaEventCreate(&e));
  const int iters = 20;
  CK(cudaEventRecord(s));
  for (int i = 0; i < iters; ++i) CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice));
  CK(cudaEventRecord(e)); CK(cudaEventSynchronize(e));
  float ms = 0; CK(cudaEventElapsedTime(&ms, s, e)); ms /= iters;
  const double gbps = 2.0 * n / ms / 1e6;
  std::printf("# device-to-device copy: %zu MiB in %.3f ms = %.0f GB/s (read + write)\n",
              n >> 20, ms, gbps);
  FILE* f = std::fopen(argv[1], "w");
  if (!f) return 1;
  std::fprintf(f, "{\"bytes_per_copy\": %zu, \"ms\": %.6f, \"gbps_read_plus_write\": %.3f, "
               "\"tool\": \"cudaMemcpyAsync\"}\n", n, ms, gbps);
  std::fclose(f);
  return 0;
}
EOF
  "$(find_nvcc)" -O2 -o /tmp/distattn_copy_bw "$src" && /tmp/distattn_copy_bw "$json"
}

# Ratios against the issue-6 goals, from the JSON files (printed last: the run's tail shows it).
bench_report() {
  python3 - "$@" <<'EOF'
import json, os, sys
d = {}
for p in sys.argv[1:]:
    try:
        d[os.path.basename(p)] = json.load(open(p))
    except Exception:
        pass
print("=== issue-6 goals (time ratios: PyTorch time / distattn time; >= goal passes)")
sdpa = d.get("sdpa.json", {}).get("results", [])
def sdpa_ms(backend, seq, causal, key):
    for r in sdpa:
        if r.get("backend") == backend and r.get("seq") == seq and r.get("causal") == causal:
            return r.get(key)
for op, goal in (("fwd", 0.7), ("bwd", 0.6)):
    for causal in (False, True):
        name = f"attn_{op}{'_causal' if causal else ''}.json"
        for row in d.get(name, {}).get("rows", []):
            s, t = row["seq"], row["time_ms"]
            fl = sdpa_ms("flash", s, causal, f"{op}_ms")
            cu = sdpa_ms("cudnn", s, causal, f"{op}_ms")
            rf = f"{fl / t:5.2f}" if fl else "  n/a"
            rc = f"{cu / t:5.2f}" if cu else "  n/a"
            ok = "PASS" if fl and fl / t >= goal else "FAIL" if fl else "?"
            print(f"  {op} causal={int(causal)} S={s:6d}: distattn {t:9.3f} ms "
                  f"{row.get('tflops', 0):6.1f} TF/s | vs flash {rf} vs cudnn {rc} "
                  f"(goal >= {goal} vs flash: {ok})")
copy = d.get("copy_bw.json", {}).get("gbps_read_plus_write")
for row in d.get("attn_decode.json", {}).get("rows", []):
    g = row.get("kv_gbps")
    frac = g / copy if g and copy else None
    ok = "PASS" if frac and frac >= 0.7 else "FAIL" if frac else "?"
    print(f"  decode S={row['seq']:7d}: {row['time_ms']:8.3f} ms, KV {g:7.0f} GB/s = "
          f"{(frac or 0) * 100:5.1f}% of copy {copy or 0:.0f} GB/s (goal >= 70%: {ok})")
for row in d.get("mla_gpu.json", {}).get("rows", []):
    r = row.get("time_vs_mla_tp")
    tag = ""
    if row.get("sharding") == "tpla" and r is not None:
        tag = f" (goal <= 0.6: {'PASS' if r <= 0.6 else 'FAIL'})"
    print(f"  mla {row.get('sharding'):9s} g={row.get('groups')} ctx={row.get('context')}: "
          f"{row.get('time_ms'):.3f} ms/rank, vs MLA-TP {r}{tag}")
EOF
}

phase_bench() {
  require_gpu || return 1
  ensure_built distattn-bench || return 1
  local J="$WORK/bench"
  rm -rf "$J"
  mkdir -p "$J"
  local b="$BIN/distattn-bench"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  step copy-bandwidth 120 copy_bandwidth "$J/copy_bw.json"
  # Forward / backward, bf16, D=128, 16 heads, S = 4K..32K, causal and not; -c checks sampled
  # rows against the fp64 reference (exit 1 on a wrong result).
  local op c tag
  for op in fwd bwd; do
    for c in "" --causal; do
      tag=${c:+_causal}
      step "attn-$op$tag" 240 env OMP_NUM_THREADS=8 "$b" attn --device cuda -d bf16 --op "$op" \
        --heads 16 --dim 128 -b 4096 -e 32768 -n 10 -w 3 -c $c --json "$J/attn_$op$tag.json"
    done
  done
  step sdpa 300 python3 "$REPO/scripts/bench_sdpa.py" --heads 16 --head-dim 128 \
    --json "$J/sdpa.json"
  # Decode: GQA 32/8, batch 8, 32K..256K cache tokens, KV GB/s vs the copy bandwidth.
  step attn-decode 300 env OMP_NUM_THREADS=8 "$b" attn --device cuda -d bf16 --op decode \
    --heads 32 --kv-heads 8 --dim 128 --batch 8 -b 32768 -e 262144 -n 20 -w 3 -c \
    --json "$J/attn_decode.json"
  # MLA decode at TP = 2, both ranks on this GPU (MPI backend with device buffers).
  step mla-tp2 300 env OMP_NUM_THREADS=4 "$PREFIX/bin/mpirun" -np 2 "$b" mla --decode \
    --device cuda --context 8K,32K,64K --json "$J/mla_gpu.json"
  bench_report "$J"/*.json | tee "$OUT/bench-goals.txt"
  BENCH_JSONS=("$J"/*.json)
}

phase_bench_1m() {
  require_gpu || return 1
  ensure_built distattn-bench || return 1
  local J="$WORK/bench-1m"
  rm -rf "$J"
  mkdir -p "$J"
  # GPU memory of every process twice a second while it runs (peak per rank, with contexts).
  nvidia-smi --query-compute-apps=timestamp,pid,used_memory --format=csv,noheader -lms 500 \
    >"$J/gpu_mem.csv" 2>/dev/null &
  local smi=$!
  free -g | sed 's/^/  host: /'
  step sp-zigzag-1m 500 env OMP_NUM_THREADS=4 DISTATTN_COMM_TIMEOUT_S=300 \
    "$PREFIX/bin/mpirun" -np 4 "$BIN/distattn-bench" sp --device cuda -d bf16 \
    --strategy zigzag -b 1M -e 1M --causal --heads 8 --kv-heads 8 --dim 128 -n 1 -w 0 \
    --baseline-iters 0 --json "$J/sp_zigzag_1m.json"
  kill "$smi" 2>/dev/null
  wait "$smi" 2>/dev/null
  python3 - "$J/gpu_mem.csv" "$J/gpu_mem_peak.json" <<'EOF'
import json, sys
peak = {}
for line in open(sys.argv[1]):
    parts = [p.strip() for p in line.split(",")]
    if len(parts) < 3 or not parts[2].split()[0].isdigit():
        continue
    pid, mib = parts[1], int(parts[2].split()[0])
    peak[pid] = max(peak.get(pid, 0), mib)
print("# GPU memory peak per process (nvidia-smi, MiB, CUDA context included):",
      ", ".join(f"pid {p}: {m}" for p, m in sorted(peak.items())) or "no samples")
json.dump({"peak_mib_per_pid": peak}, open(sys.argv[2], "w"), indent=1)
EOF
  BENCH_JSONS=("$J/sp_zigzag_1m.json" "$J/gpu_mem_peak.json")
}

if [ "$PHASE" = env ]; then
  [ -f "$ENV_FILE" ] || { echo "no $ENV_FILE: run setup first" >&2; exit 1; }
  cat "$ENV_FILE"
  exit 0
fi

BENCH_JSONS=()
rc=0
case "$PHASE" in
  setup) phase_setup || rc=$? ;;
  test) phase_test || rc=$? ;;
  sanitize) phase_sanitize || rc=$? ;;
  bench) phase_bench || rc=$? ;;
  bench-1m) phase_bench_1m || rc=$? ;;
esac
summary_json "$OUT/$PHASE-summary.json" "${BENCH_JSONS[@]}"
# A phase fails when any of its steps did not finish with 0.
if [ "$rc" -eq 0 ] && awk -F'\t' '$2 != 0 {bad = 1} END {exit !bad}' "$STEPS"; then rc=1; fi
rm -f "$STEPS"
say "done in $(elapsed)s, rc=$rc; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
# Let tee write the last lines before the run tool collects $OUT.
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit "$rc"
