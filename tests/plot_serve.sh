#!/bin/sh
# Usage: plot_serve.sh <mpiexec> <distattn-serve> <repo> [mpiexec flags...]
# A small two-rate sweep of both modes written as JSON, then scripts/plot_serve.py turns it into
# the four PNGs; skipped (77) without Debian's python3-matplotlib.
set -u
mpiexec=$1
serve=$2
repo=$3
shift 3
py=/usr/bin/python3
if ! "$py" -c 'import matplotlib' 2>/dev/null; then
  echo "skipped: $py has no matplotlib (apt-get install python3-matplotlib)"
  exit 77
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
timeout 120 "$mpiexec" -n 2 "$@" "$serve" --hidden 128 --heads 4 --kv-heads 2 --head-dim 16 \
  --layers 2 --ffn 256 --vocab 256 --requests 6 --input-len 24 --output-len 4 --page-size 4 \
  --kv-pages 64 --mode both --rate 50,100 --goodput "ttft:500 tpot:50" --json "$tmp/s.json" \
  --no-progress || { echo "FAIL: distattn-serve failed"; exit 1; }
"$py" -c "
import json, sys
runs = json.load(open('$tmp/s.json'))
assert len(runs) == 4, len(runs)
assert sorted({r['mode'] for r in runs}) == ['colocated', 'disagg']
for r in runs:
    assert len(r['requests_ttft_ms']) == r['completed'] and 0 <= r['slo_attainment'] <= 1
" || { echo "FAIL: unexpected JSON"; exit 1; }
"$py" "$repo/scripts/plot_serve.py" "$tmp/s.json" --out "$tmp/png" || exit 1
for f in ttft_cdf tpot_cdf slo_attainment itl_p99; do
  [ -s "$tmp/png/$f.png" ] || { echo "FAIL: $f.png missing"; exit 1; }
done
echo "PASS"
