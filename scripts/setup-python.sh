#!/usr/bin/env bash
# Makes the Python environment the distattn package builds and is tested in: a venv over
# Debian's system Python (/usr/bin/python3) with --system-site-packages, so that Debian's
# python3-torch (CPU), python3-numpy, python3-pytest and python3-mpi4py (installed by
# setup-deps.sh) are visible in it, plus nanobind and scikit-build-core from PyPI (the build
# requirements of pyproject.toml, a few MB). Idempotent: does nothing when the venv has them.
# Environment: DISTATTN_VENV (default <repo>/.venv), DISTATTN_BASE_PYTHON (default
# /usr/bin/python3, else python3 on PATH).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DISTATTN_VENV:-$REPO/.venv}"
BASE="${DISTATTN_BASE_PYTHON:-/usr/bin/python3}"
if [ ! -x "$BASE" ]; then BASE="$(command -v python3 || true)"; fi
if [ -z "$BASE" ]; then
  echo "[setup-python] no python3 found: the Python package and its tests are skipped" >&2
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-python] creating $VENV (from $BASE, --system-site-packages)"
  "$BASE" -m venv --system-site-packages "$VENV"
fi
if "$VENV/bin/python" -c 'import nanobind, scikit_build_core' >/dev/null 2>&1; then
  echo "[setup-python] $VENV is ready"
  exit 0
fi
echo "[setup-python] installing nanobind and scikit-build-core into $VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  "nanobind>=2.0" "scikit-build-core>=0.10"
