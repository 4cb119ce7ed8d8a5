#!/usr/bin/env bash
# Installs missing build dependencies, builds distattn, then runs the main job:
# distattn-bench under launch/mpirun.sh.
#   scripts/run.sh                 default job (comm benchmark over all ops)
#   scripts/run.sh -b 1M -e 64M    extra options appended to the default job
#   scripts/run.sh comm --op all_reduce -n 50   a full distattn-bench command line
# Environment: NP (ranks; default 2 on CPU, one per GPU on a multi-GPU node), MPIRUN,
# MPIRUN_ARGS (see launch/mpirun.sh), BUILD_DIR / DISTATTN_CUDA / CMAKE_ARGS (see build.sh),
# SKIP_SETUP=1 / SKIP_BUILD=1 to skip those steps.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export BUILD_DIR="${BUILD_DIR:-$REPO/build}"

if [ "${SKIP_SETUP:-0}" != 1 ]; then bash "$REPO/scripts/setup-deps.sh"; fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then bash "$REPO/scripts/build.sh" distattn-bench; fi

BENCH="$BUILD_DIR/bin/distattn-bench"
[ -x "$BENCH" ] || { echo "[run] $BENCH not found (build failed?)" >&2; exit 1; }

# GPU run only when the build has CUDA and the machine has a GPU.
gpus=0
if grep -q '^#define DISTATTN_WITH_CUDA 1' "$BUILD_DIR/include/distattn/config.h" 2>/dev/null &&
   command -v nvidia-smi >/dev/null 2>&1; then
  gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
if [ "$gpus" -gt 0 ]; then
  DEVICE_ARGS=(--device cuda --backend auto)
  # One rank per GPU (NCCL); a single GPU runs 2 ranks over the MPI backend with device buffers.
  default_np=$(( gpus >= 2 ? gpus : 2 ))
  echo "[run] $gpus GPU(s): device cuda, backend auto"
else
  DEVICE_ARGS=(--device cpu --backend mpi)
  # 2 ranks: this job is bandwidth-bound, more ranks than cores only adds contention.
  default_np=2
  echo "[run] no GPU: device cpu, backend mpi"
fi
export NP="${NP:-$default_np}"

# The main job. (Switches to attention once that benchmark lands.)
DEFAULT_JOB=(comm)
DEFAULT_OPTS=(--op all "${DEVICE_ARGS[@]}")
if [ "$#" -gt 0 ] && [[ "$1" != -* ]]; then
  ARGS=("$@")                 # a full subcommand line
else
  # Default options the caller did not give (an option may appear only once).
  ARGS=("${DEFAULT_JOB[@]}")
  for ((i = 0; i < ${#DEFAULT_OPTS[@]}; i += 2)); do
    opt="${DEFAULT_OPTS[i]}"
    given=0
    for a in "$@"; do [[ "$a" == "$opt" || "$a" == "$opt="* ]] && given=1; done
    if [ "$given" -eq 0 ]; then ARGS+=("$opt" "${DEFAULT_OPTS[i + 1]}"); fi
  done
  ARGS+=("$@")
fi

echo "[run] NP=$NP: distattn-bench ${ARGS[*]}"
exec bash "$REPO/launch/mpirun.sh" "$BENCH" "${ARGS[@]}"
