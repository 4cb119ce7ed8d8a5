#!/usr/bin/env bash
# Installs missing build dependencies, builds distattn, then runs the main job:
# distattn-bench under launch/mpirun.sh.
#   scripts/run.sh                 default job: causal GQA attention sharded across the ranks by
#                                  every strategy (heads, ring, zigzag, ulysses, allgather,
#                                  hybrid), checked against the fp64 reference
#   scripts/run.sh -b 16K -e 16K   extra options appended to the default job
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
  DEVICE_ARGS=(--device cuda)
  # One rank per GPU (NCCL); a single GPU runs 2 ranks over the MPI backend with device buffers.
  default_np=$(( gpus >= 2 ? gpus : 2 ))
  echo "[run] $gpus GPU(s): device cuda, backend auto"
else
  DEVICE_ARGS=(--device cpu)
  # 2 ranks, one core each: more ranks than cores only adds contention.
  default_np=2
  echo "[run] no GPU: device cpu, backend mpi"
fi
export NP="${NP:-$default_np}"

# The main job: distributed attention, every sequence/head-parallel strategy, with the
# parallel efficiency, communication volume, exposed communication and max error per row.
DEFAULT_JOB=(sp)
# (option, value) pairs; an empty value is a flag (--causal, --check take no separate value).
DEFAULT_OPTS=(--strategy all -b 8K -e 8K --causal "" --heads 8 --kv-heads 2 --dim 128
              --check "" "${DEVICE_ARGS[@]}")
if [ "$#" -gt 0 ] && [[ "$1" != -* ]]; then
  ARGS=("$@")                 # a full subcommand line
else
  # Default options the caller did not give (an option may appear only once).
  ARGS=("${DEFAULT_JOB[@]}")
  for ((i = 0; i < ${#DEFAULT_OPTS[@]}; i += 2)); do
    opt="${DEFAULT_OPTS[i]}"
    given=0
    for a in "$@"; do [[ "$a" == "$opt" || "$a" == "$opt="* ]] && given=1; done
    [[ "$opt" == --check ]] && for a in "$@"; do [[ "$a" == -c* ]] && given=1; done
    if [ "$given" -eq 0 ]; then
      ARGS+=("$opt")
      if [ -n "${DEFAULT_OPTS[i + 1]}" ]; then ARGS+=("${DEFAULT_OPTS[i + 1]}"); fi
    fi
  done
  ARGS+=("$@")
fi

echo "[run] NP=$NP: distattn-bench ${ARGS[*]}"
exec bash "$REPO/launch/mpirun.sh" "$BENCH" "${ARGS[@]}"
