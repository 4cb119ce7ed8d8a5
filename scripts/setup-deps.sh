#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages distattn's build needs. Idempotent: when every package
# is already installed it touches nothing (no apt-get at all). CUDA and NCCL are not
# installed here: the CUDA toolkit (with NCCL) comes from NVIDIA; without it distattn builds
# its CPU/MPI parts only. NumPy (for the .npy round-trip check against a NumPy attention) is
# installed from PyPI into the python3 on PATH when missing; without it that one test skips.
# --test (scripts/test.sh passes it) also installs Debian's slurm-wlm and munge for the SLURM
# launch test (tests/slurm_launch.sh starts daemons of its own, not the packages' services),
# except where a SLURM not from Debian's packages is on PATH (a cluster's own: left alone);
# where they cannot be installed, that test skips.
set -euo pipefail

WITH_SLURM=0
if [ "${1:-}" = --test ]; then WITH_SLURM=1; fi

ensure_numpy() {
  command -v python3 >/dev/null 2>&1 || return 0
  if python3 -c 'import numpy' >/dev/null 2>&1; then return 0; fi
  echo "[setup-deps] installing numpy for $(command -v python3)"
  python3 -m pip install --quiet numpy ||
    echo "[setup-deps] numpy could not be installed: the npy round-trip test will skip" >&2
}

ensure_slurm() {
  [ "$WITH_SLURM" = 1 ] || return 0
  local sbatch p missing=() sudo=()
  sbatch="$(command -v sbatch || true)"
  if [ -n "$sbatch" ] && ! dpkg -S "$(readlink -f "$sbatch")" >/dev/null 2>&1; then
    echo "[setup-deps] $sbatch is not from a Debian package: SLURM left as it is"
    return 0
  fi
  for p in slurm-wlm munge; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ "${#missing[@]}" -gt 0 ] || return 0
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  echo "[setup-deps] installing for the SLURM launch test: ${missing[*]}"
  "${sudo[@]}" apt-get update && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${missing[@]}" ||
    echo "[setup-deps] ${missing[*]} not installed: the SLURM launch test will skip" >&2
}

PACKAGES=(
  cmake ninja-build g++
  openmpi-bin libopenmpi-dev
  libboost-program-options-dev
  libgtest-dev
  libopenblas-dev
  # sanitizer and fuzz builds (scripts/sanitize.sh): clang, its ASan/UBSan/TSan/libFuzzer
  # runtimes, LLVM's OpenMP runtime
  clang libclang-rt-14-dev libomp-14-dev
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg -s "$p" >/dev/null 2>&1; then missing+=("$p"); fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "[setup-deps] all build dependencies are installed"
  ensure_slurm
  ensure_numpy
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup-deps] missing packages: ${missing[*]}" >&2
  echo "[setup-deps] apt-get not found: install them with your package manager" >&2
  exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "[setup-deps] missing packages: ${missing[*]}; run as root or install sudo" >&2
    exit 1
  fi
fi

echo "[setup-deps] installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update
"${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
ensure_slurm
ensure_numpy
echo "[setup-deps] done"
