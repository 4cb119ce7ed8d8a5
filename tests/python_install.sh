#!/usr/bin/env bash
# `pip install .` as the README says, into a fresh venv over the system Python (so that
# Debian's python3-torch is visible and pip fetches scikit-build-core and nanobind itself),
# CPU kernels only; then the INSTALLED package (run from outside the source tree) trains
# examples/train_zigzag.py at 2 ranks and its loss curve must match PyTorch's.
# Usage: python_install.sh SOURCE_DIR PYTHON WORK_DIR MPIEXEC [mpiexec flags...]
set -euo pipefail
src="$1" py="$2" work="$3" mpiexec="$4"
shift 4
rm -rf "$work"
mkdir -p "$work"
"$py" -m venv --system-site-packages "$work/venv"
start=$(date +%s)
"$work/venv/bin/pip" install --quiet --disable-pip-version-check \
  --config-settings=cmake.define.DISTATTN_CUDA=OFF --config-settings=build-dir="$work/build" \
  "$src"
echo "[python_install] pip install . took $(($(date +%s) - start)) s"
cd "$work"
"$work/venv/bin/python" -c "import distattn, sys; assert distattn.__file__.startswith('$work'), distattn.__file__; print('installed', distattn.__file__)"
"$mpiexec" -np 2 "$@" "$work/venv/bin/python" "$src/examples/train_zigzag.py" --steps 5
