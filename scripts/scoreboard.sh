#!/usr/bin/env bash
# Re-measures the headline figures of docs/PERFORMANCE.md ("Scoreboard") in one go, on a
# machine with nothing else running. Every figure comes from one distattn-bench command;
# each command's table goes to $OUT/<name>.log and its rows to $OUT/<name>.json.
#   scripts/scoreboard.sh [OUT]        (default OUT=scoreboard-<date>)
# Environment: BUILD_DIR (default build), SKIP_BUILD=1, ONLY="comm attn sp mla" (subset).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export BUILD_DIR="${BUILD_DIR:-$REPO/build}"
OUT="${1:-$REPO/scoreboard-$(date -u +%Y%m%d-%H%M)}"
ONLY="${ONLY:-comm attn sp mla}"
mkdir -p "$OUT"
if [ "${SKIP_BUILD:-0}" != 1 ]; then bash "$REPO/scripts/build.sh" distattn-bench; fi
BENCH="$BUILD_DIR/bin/distattn-bench"
MPI="$REPO/launch/mpirun.sh"

run() {  # run NAME CMD...   (prints the command, tees the table)
  local name="$1"
  shift
  echo "### $name: $*" | tee "$OUT/$name.log"
  local t0=$(date +%s)
  "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "### $name took $(( $(date +%s) - t0 )) s" | tee -a "$OUT/$name.log"
}

echo "# scoreboard $(date -u) on $(hostname): $(getconf _NPROCESSORS_ONLN) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" |
  tee "$OUT/machine.txt"
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-200 >>"$OUT/machine.txt"

if [[ " $ONLY " == *" comm "* ]]; then
  for np in 2 4; do
    NP=$np run "comm_np$np" "$MPI" "$BENCH" comm --op all -b 16M -e 16M -n 50 -w 5 --raw-mpi \
      --json "$OUT/comm_np$np.json"
  done
fi

if [[ " $ONLY " == *" attn "* ]]; then
  # OpenBLAS with its native kernel for the sgemm ceiling: unset the machine's overrides for
  # these runs only.
  for op in fwd bwd; do
    run "attn_$op" env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=2 \
      "$BENCH" attn --op "$op" -b 4K -e 4K --heads 16 --dim 128 -n 3 -w 1 --gemm-ceiling -c \
      --json "$OUT/attn_$op.json"
  done
  run attn_decode env OMP_NUM_THREADS=2 "$BENCH" attn --op decode --heads 32 --kv-heads 8 \
    --dim 128 --causal -b 4K -e 64K -f 4 -n 10 -w 2 -c --json "$OUT/attn_decode.json"
fi

if [[ " $ONLY " == *" sp "* ]]; then
  # The issue's goal point: 2 ranks, one core each, 32K causal.
  OMP_NUM_THREADS=1 NP=2 run sp_32k_np2 "$MPI" "$BENCH" sp --strategy zigzag,ring -b 32K -e 32K \
    --causal --heads 4 --kv-heads 4 --dim 128 -n 2 -w 1 -c --json "$OUT/sp_32k_np2.json"
  OMP_NUM_THREADS=1 NP=2 run sp_8k_np2 "$MPI" "$BENCH" sp --strategy all -b 8K -e 8K --causal \
    --heads 8 --kv-heads 2 --dim 128 -n 3 -w 1 -c --backward --json "$OUT/sp_8k_np2.json"
  OMP_NUM_THREADS=1 NP=4 run sp_64k_np4 "$MPI" "$BENCH" sp --strategy zigzag -b 64K -e 64K \
    --causal --heads 4 --kv-heads 4 --dim 128 -n 1 -w 0 --baseline-iters 0 -c \
    --json "$OUT/sp_64k_np4.json"
fi

if [[ " $ONLY " == *" mla "* ]]; then
  for np in 2 4; do
    OMP_NUM_THREADS=1 NP=$np run "mla_decode_np$np" "$MPI" "$BENCH" mla --decode --device cpu \
      --context 8K,32K,64K -n 10 -w 2 --json "$OUT/mla_decode_np$np.json"
  done
  OMP_NUM_THREADS=1 NP=2 run mla_accuracy "$MPI" "$BENCH" mla --accuracy --device cpu \
    --context 4K --decode-len 4K --json "$OUT/mla_accuracy.json"
fi
echo "# results in $OUT"
