#!/usr/bin/env bash
# Downloads, on a machine WITH internet (Debian 12 "bookworm", amd64, apt configured), the
# .deb files distattn needs to build and run its tests and distattn-bench on a GPU machine
# that has CUDA, CMake, ninja and g++ but no Open MPI, Boost.Program_options or GoogleTest
# and no network (docs/GPU_RUNBOOK.md). They go to <repo>/.gpu-debs/, which this script adds
# to .git/info/exclude: the device `run` tool sends it only when it is named in `carry`.
# scripts/gpu-verify.sh setup unpacks them with `dpkg -x` into a prefix (never onto /).
#
# Why Debian 12 packages: they need glibc >= 2.36 and libstdc++ >= GCC 12, so they run on
# Ubuntu 24.04 (glibc 2.39) and can be proven here, on the machine that downloads them.
# Every package is downloaded without its Depends (`apt-get download`); the list below is
# the runtime closure of Open MPI 4.1 + Boost.Program_options 1.74 (apt-cache depends
# --recurse), minus what every glibc/g++ system has (libc6, libstdc++6, libgcc-s1, zlib1g,
# libatomic1), minus Fortran, ssh, X11/OpenCL hwloc plugins and the docs-only -dev deps.
# Libraries in FALLBACK_PACKAGES are generic system libraries: gpu-verify.sh drops each one
# whose soname the GPU machine already has, so they never shadow the system's newer copy.
#
# Also copies nccl.h from the local CUDA toolkit (NCCL 2.28 here) to .gpu-debs/nccl/include:
# pip's nvidia-nccl-cu13 wheel in the GPU machine's torch venv ships libnccl.so.2 but maybe
# not the header; gpu-verify.sh uses it only when no nccl.h is found there.
#
# Idempotent: a .deb already present (same file name = same version) is not downloaded again;
# debs not on the current list are removed. Prints the total size (the `run` tool carries at
# most 64 MiB together with the working tree).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$REPO/.gpu-debs"

# Open MPI 4.1 and what libmpi/libopen-pal/orterun and its MCA components load.
MPI_PACKAGES=(
  openmpi-bin openmpi-common libopenmpi3 libopenmpi-dev
  libhwloc15 libevent-core-2.1-7 libevent-pthreads-2.1-7 libpmix2 libmunge2
  libfabric1 libucx0 libpsm2-2 libpsm-infinipath1 libibverbs1 librdmacm1 ibverbs-providers
)
# Generic libraries a CUDA image may or may not have (deduplicated against the system there).
FALLBACK_PACKAGES=(libnl-3-200 libnl-route-3-200 libnuma1 libudev1)
BOOST_PACKAGES=(
  libboost-program-options-dev libboost-program-options1.74-dev
  libboost-program-options1.74.0 libboost1.74-dev
)
GTEST_PACKAGES=(libgtest-dev)

ALL=("${MPI_PACKAGES[@]}" "${FALLBACK_PACKAGES[@]}" "${BOOST_PACKAGES[@]}" "${GTEST_PACKAGES[@]}")

command -v apt-get >/dev/null || { echo "[gpu-deps] needs apt-get (Debian 12)" >&2; exit 1; }
if [ "$(dpkg --print-architecture)" != amd64 ]; then
  echo "[gpu-deps] this machine is $(dpkg --print-architecture); the GPU machine is amd64" >&2
  exit 1
fi
. /etc/os-release
if [ "${VERSION_CODENAME:-}" != bookworm ]; then
  echo "[gpu-deps] warning: this is ${PRETTY_NAME:-unknown}, not Debian 12; the debs follow" \
    "this machine's apt sources and were only proven from Debian 12" >&2
fi

mkdir -p "$DEST/nccl/include"
# Keep .gpu-debs (carried) and gpu-out (local gpu-verify.sh results) out of git and out of
# the plain working-tree transfer.
EXCLUDE="$(git -C "$REPO" rev-parse --git-path info/exclude 2>/dev/null ||
  echo "$REPO/.git/info/exclude")"
case "$EXCLUDE" in /*) ;; *) EXCLUDE="$REPO/$EXCLUDE" ;; esac
mkdir -p "$(dirname "$EXCLUDE")"
for pat in /.gpu-debs/ /gpu-out/; do
  grep -qxF "$pat" "$EXCLUDE" 2>/dev/null || echo "$pat" >>"$EXCLUDE"
done

# File names apt gives the candidate versions: name_version_arch.deb, an epoch's ':' as %3a.
# One apt-cache call for all packages (each call loads the whole cache).
deb_names() {
  apt-cache show --no-all-versions "$@" | awk '
    /^Package:/ {p = $2} /^Version:/ {v = $2} /^Architecture:/ {a = $2}
    /^$/ && p != "" {gsub(":", "%3a", v); print p "_" v "_" a ".deb"; p = ""}
    END {if (p != "") {gsub(":", "%3a", v); print p "_" v "_" a ".deb"}}'
}

policy=$(apt-cache policy openmpi-bin 2>/dev/null || true)
if ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
  echo "[gpu-deps] apt-get update"
  apt-get update -qq
fi

mapfile -t NAMES < <(deb_names "${ALL[@]}")
if [ "${#NAMES[@]}" -ne "${#ALL[@]}" ]; then
  echo "[gpu-deps] apt-cache found ${#NAMES[@]} of ${#ALL[@]} packages: run apt-get update" >&2
  exit 1
fi

wanted=()
fetch=()
for f in "${NAMES[@]}"; do
  wanted+=("$f")
  [ -s "$DEST/$f" ] || fetch+=("${f%%_*}")
done
if [ "${#fetch[@]}" -gt 0 ]; then
  echo "[gpu-deps] downloading ${#fetch[@]} packages: ${fetch[*]}"
  (cd "$DEST" && apt-get download -q -o APT::Sandbox::User=root "${fetch[@]}")
else
  echo "[gpu-deps] all ${#ALL[@]} packages already in $DEST"
fi
# Remove stale versions / packages no longer listed (keeps the carry small and unambiguous).
for f in "$DEST"/*.deb; do
  [ -e "$f" ] || continue
  keep=0
  for w in "${wanted[@]}"; do [ "$(basename "$f")" = "$w" ] && keep=1 && break; done
  if [ "$keep" = 0 ]; then
    echo "[gpu-deps] removing stale $(basename "$f")"
    rm -f "$f"
  fi
done
for w in "${wanted[@]}"; do
  [ -s "$DEST/$w" ] || { echo "[gpu-deps] missing after download: $w" >&2; exit 1; }
done

# Which packages are generic fallbacks (gpu-verify.sh dedupes their libraries).
printf '%s\n' "${FALLBACK_PACKAGES[@]}" >"$DEST/fallback-packages.txt"
{
  echo "# written by scripts/gpu-deps.sh on $(date -u +%Y-%m-%dT%H:%MZ) from ${PRETTY_NAME:-?}"
  printf '%s\n' "${wanted[@]}"
} >"$DEST/MANIFEST.txt"

NCCL_H=""
for d in "${CUDA_HOME:-/usr/local/cuda}/include" /usr/include; do
  if [ -f "$d/nccl.h" ]; then NCCL_H="$d/nccl.h"; break; fi
done
if [ -n "$NCCL_H" ]; then
  cp -f "$NCCL_H" "$DEST/nccl/include/nccl.h"
  v=$(awk '/#define NCCL_(MAJOR|MINOR|PATCH) /{printf "%s%s", s, $3; s="."}' "$NCCL_H")
  echo "[gpu-deps] nccl.h $v copied from $NCCL_H (fallback header for pip's libnccl.so.2)"
else
  echo "[gpu-deps] no nccl.h here: the GPU build will use one only if that machine has it" >&2
fi

total=$(du -sb "$DEST" | awk '{print $1}')
echo "[gpu-deps] $DEST: $(ls "$DEST"/*.deb | wc -l) debs, total $((total / 1024)) KiB" \
  "($(awk -v b="$total" 'BEGIN {printf "%.1f", b / 1048576}') MiB; the run tool's limit is 64 MiB" \
  "with the working tree)"
if [ "$total" -gt $((48 * 1024 * 1024)) ]; then
  echo "[gpu-deps] error: over 48 MiB, too close to the 64 MiB transfer limit" >&2
  exit 1
fi
