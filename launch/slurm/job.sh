# shellcheck shell=bash
# Shared body of the SLURM templates (distattn.sbatch, distattn-cpu.sbatch), sourced by them
# after they have found the checkout ($REPO) and set DEFAULT_ARGS (distattn-bench arguments
# for a job submitted without any). Starts one rank per task of the allocation.
#
# The program: a first argument naming a binary (distattn-bench, another distattn-*, or a path
# with a '/'), else $DISTATTN_BIN, else distattn-bench; a bare name is looked up in
# $BUILD_DIR/bin (BUILD_DIR default <checkout>/build, relative to the checkout). The other
# arguments pass through to it.
#
# Launcher (DISTATTN_LAUNCHER): auto (default) starts the ranks with `srun --mpi=pmix` when
# this SLURM lists a PMIx plugin (`srun --mpi=list`), else with launch/mpirun.sh inside the
# allocation (Open MPI reads the node list from SLURM); srun or mpirun forces one (mpirun
# where Open MPI cannot use SLURM's PMIx: under srun each rank would start alone, or fail).

PROGRAM="${DISTATTN_BIN:-distattn-bench}"
ARGS=("$@")
if [ "${#ARGS[@]}" -gt 0 ] && [[ "${ARGS[0]}" == distattn-* || "${ARGS[0]}" == */* ]]; then
  PROGRAM="${ARGS[0]}"
  ARGS=("${ARGS[@]:1}")
fi
BIN="$PROGRAM"
if [[ "$PROGRAM" != */* ]]; then
  BUILD="${BUILD_DIR:-build}"
  [[ "$BUILD" == /* ]] || BUILD="$REPO/$BUILD"
  BIN="$BUILD/bin/$PROGRAM"
fi
if [ ! -x "$BIN" ]; then
  echo "distattn: $BIN not found. Build it (scripts/build.sh), or set DISTATTN_REPO to the" \
    "checkout (now $REPO), BUILD_DIR to its build folder or DISTATTN_BIN to the binary." >&2
  exit 1
fi
if [ "${#ARGS[@]}" -eq 0 ] && [ "$(basename "$BIN")" = distattn-bench ]; then
  ARGS=("${DEFAULT_ARGS[@]}")
fi

export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
NODES="${SLURM_JOB_NUM_NODES:-1}"
NTASKS="${SLURM_NTASKS:-1}"
PER_NODE="${SLURM_NTASKS_PER_NODE:-$(((NTASKS + NODES - 1) / NODES))}"
PER_NODE="${PER_NODE%%(*}" # "8(x2)" -> "8" on heterogeneous allocations

LAUNCHER="${DISTATTN_LAUNCHER:-auto}"
if [ "$LAUNCHER" = auto ]; then
  LAUNCHER=mpirun
  if srun --mpi=list 2>&1 | grep -q pmix; then LAUNCHER=srun; fi
fi

echo "distattn: $NODES nodes x $PER_NODE tasks = $NTASKS ranks: $BIN ${ARGS[*]}"
case "$LAUNCHER" in
  srun)
    # PMIx lets srun start the MPI ranks directly (Open MPI built with PMIx support).
    echo "distattn: launcher srun --mpi=pmix"
    exec srun --mpi=pmix --cpu-bind=none "$BIN" "${ARGS[@]}"
    ;;
  mpirun)
    # launch/mpirun.sh adds what Open MPI needs (root, DISTATTN_* forwarding, binding).
    NP="$NTASKS" MPIRUN_ARGS="--map-by ppr:${PER_NODE}:node ${MPIRUN_ARGS:-}" \
      exec "$REPO/launch/mpirun.sh" "$BIN" "${ARGS[@]}"
    ;;
  *)
    echo "distattn: DISTATTN_LAUNCHER=$LAUNCHER: use auto, srun or mpirun" >&2
    exit 2
    ;;
esac
