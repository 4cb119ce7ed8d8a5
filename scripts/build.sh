#!/usr/bin/env bash
# Configures and builds distattn (Release, Ninja) into $BUILD_DIR (default: <repo>/build).
# Environment:
#   BUILD_DIR      build directory (default <repo>/build)
#   BUILD_TYPE     CMake build type (default Release)
#   DISTATTN_CUDA  AUTO | ON | OFF (default AUTO: CUDA kernels + NCCL when nvcc is found)
#   CMAKE_ARGS     extra arguments for the configure step (word-split)
#   JOBS           parallel build jobs (default: number of cores)
#   DISTATTN_VENV  venv whose Python the extension is built for (default <repo>/.venv, if any)
# Arguments: build targets (default: all).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$REPO/build}"
BUILD_TYPE="${BUILD_TYPE:-Release}"
DISTATTN_CUDA="${DISTATTN_CUDA:-AUTO}"
JOBS="${JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"
read -r -a EXTRA <<<"${CMAKE_ARGS:-}"
# The Python extension is built for the venv of scripts/setup-python.sh when there is one.
VENV="${DISTATTN_VENV:-$REPO/.venv}"
if [ -x "$VENV/bin/python" ] && [[ " ${EXTRA[*]} " != *" -DPython_EXECUTABLE="* ]]; then
  EXTRA+=("-DPython_EXECUTABLE=$VENV/bin/python")
fi

GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi
# A build dir configured with another generator cannot be switched: keep its generator.
if [ -f "$BUILD_DIR/CMakeCache.txt" ]; then GEN=(); fi

echo "[build] configure: $BUILD_DIR (type=$BUILD_TYPE, DISTATTN_CUDA=$DISTATTN_CUDA)"
cmake -S "$REPO" -B "$BUILD_DIR" "${GEN[@]}" \
  -DCMAKE_BUILD_TYPE="$BUILD_TYPE" -DDISTATTN_CUDA="$DISTATTN_CUDA" "${EXTRA[@]}"

echo "[build] build: $JOBS jobs${*:+, targets: $*}"
TARGETS=()
for t in "$@"; do TARGETS+=(--target "$t"); done
cmake --build "$BUILD_DIR" --parallel "$JOBS" "${TARGETS[@]}"

echo "[build] binaries are in $BUILD_DIR/bin/ (distattn-bench, test_*); library in $BUILD_DIR/lib/"
