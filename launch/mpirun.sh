#!/usr/bin/env bash
# Starts one process per rank with Open MPI's mpirun (or another launcher through MPIRUN).
#   NP=4 launch/mpirun.sh build/bin/distattn-bench comm --op all_reduce
# Environment:
#   NP           number of ranks (default 2)
#   MPIRUN       launcher (default: mpirun)
#   MPIRUN_ARGS  extra launcher arguments, word-split (e.g. "--hostfile hosts --map-by node")
#   OMP_NUM_THREADS  default: cores / NP (at least 1), so CPU kernels of co-located ranks
#                    don't fight over cores
#   OPENBLAS_CORETYPE  default SkylakeX on CPUs with AVX-512: Debian's OpenBLAS 0.3.21 does
#                    not recognise newer Xeons and falls back to its SSE3 (Prescott) kernels,
#                    3-5x slower for the serving model's GEMMs
# Open MPI flags added automatically: --bind-to none (ranks pick their own cores/GPU);
# --oversubscribe and mpi_yield_when_idle when NP > cores (waiting ranks yield the CPU
# instead of spinning); --allow-run-as-root when run as root (containers).
# GPU binding: distattn binds rank -> GPU (local_rank % visible GPUs) itself; don't set
# CUDA_VISIBLE_DEVICES per rank unless you also want to restrict it.
set -euo pipefail

if [ "$#" -lt 1 ]; then
  echo "usage: NP=<ranks> $0 <program> [args...]" >&2
  exit 2
fi

NP="${NP:-2}"
MPIRUN="${MPIRUN:-mpirun}"
read -r -a USER_ARGS <<<"${MPIRUN_ARGS:-}"
# getconf, not nproc: nproc honors OMP_NUM_THREADS, which callers set per rank.
cores="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"

if ! command -v "$MPIRUN" >/dev/null 2>&1; then
  echo "[mpirun.sh] launcher '$MPIRUN' not found (install openmpi-bin or set MPIRUN)" >&2
  exit 1
fi

if [ -z "${OMP_NUM_THREADS:-}" ]; then
  t=$(( cores / NP ))
  export OMP_NUM_THREADS=$(( t > 0 ? t : 1 ))
fi

if [ -z "${OPENBLAS_CORETYPE:-}" ] && grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  export OPENBLAS_CORETYPE=SkylakeX
fi

FLAGS=(-np "$NP")
if "$MPIRUN" --version 2>&1 | grep -q "Open MPI"; then
  FLAGS+=(--bind-to none -x OMP_NUM_THREADS)
  if [ -n "${OPENBLAS_CORETYPE:-}" ]; then FLAGS+=(-x OPENBLAS_CORETYPE); fi
  if [ "$NP" -gt "$cores" ]; then
    FLAGS+=(--oversubscribe --mca mpi_yield_when_idle 1)
  fi
  if [ "$(id -u)" -eq 0 ]; then FLAGS+=(--allow-run-as-root); fi
  # Forward distattn tunables to every rank (Open MPI only forwards what -x names).
  while IFS='=' read -r name _; do
    FLAGS+=(-x "$name")
  done < <(env | grep '^DISTATTN_' || true)
fi

echo "[mpirun.sh] $MPIRUN ${FLAGS[*]} ${USER_ARGS[*]} $*"
exec "$MPIRUN" "${FLAGS[@]}" "${USER_ARGS[@]}" "$@"
