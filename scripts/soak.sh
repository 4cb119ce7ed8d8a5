#!/usr/bin/env bash
# Soak: random strategy x shape x dtype x rank count runs of `distattn-bench sp ... -c` for
# DURATION (90, 90s, 30m, 2h), every result checked against the fp64 reference, RSS, fds and
# threads of every rank sampled (RSS growth <= 1% after warm-up, no fd or thread growth).
# Exit 1 on any failure. Details and options: scripts/soak.py --help.
#   scripts/soak.sh 30m                      (builds distattn-bench first unless SKIP_BUILD=1)
#   scripts/soak.sh 2h --seed 7 --log soak.log
# Environment: BUILD_DIR (default <repo>/build), MPIRUN (default mpirun), SKIP_BUILD=1.
# Shares the cores with whatever else runs: prefix `nice` on a shared machine.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export BUILD_DIR="${BUILD_DIR:-$REPO/build}"
[ $# -ge 1 ] || { echo "usage: scripts/soak.sh DURATION [soak.py options]" >&2; exit 2; }
if [ "${SKIP_BUILD:-0}" != 1 ]; then bash "$REPO/scripts/build.sh" distattn-bench; fi
exec python3 "$REPO/scripts/soak.py" "$@" --bench "$BUILD_DIR/bin/distattn-bench" \
  --mpirun "${MPIRUN:-mpirun}"
