#!/bin/sh
# Usage: bench_attn_cli.sh <distattn-bench> <scratch dir>
# `distattn-bench attn --bw-ceiling`: a decode run prints the copy ceiling and a vs_copy
# column and writes them to its JSON (the same-run ratio of issue 13); misuse is rejected
# with a message in CLI words.
set -u
bench=$1
dir=$2
sub=attn
fails=0
. "$(dirname "$0")/cli_expect.sh"
expect "use it with --op decode" --op fwd --bw-ceiling
expect "--bw-bytes must be in [1M, 8G]" --op decode --bw-ceiling --bw-bytes 12K
expect "--bw-bytes must be in [1M, 8G]" --op decode --bw-ceiling --bw-bytes 9G

json=$dir/bench_attn_bw_ceiling.json
rm -f "$json"
out=$("$bench" attn --op decode -d bf16 --heads 8 --kv-heads 2 --dim 64 -b 1K -e 2K -n 1 -w 0 \
  --bw-ceiling --bw-bytes 16M --json "$json" 2>&1)
rc=$?
printf '%s\n' "$out"
if [ "$rc" -ne 0 ]; then
  echo "FAIL: decode with --bw-ceiling exited $rc"
  fails=$((fails + 1))
fi
for want in "# memory copy of 16 MiB, read + write" "vs_copy"; do
  if ! printf '%s\n' "$out" | grep -qF -- "$want"; then
    echo "FAIL: output lacks '$want'"
    fails=$((fails + 1))
  fi
done
# Every row's vs_copy is kv_gbps / copy_gbps of the header, and both are positive.
if ! python3 - "$json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
copy = j["header"]["copy_gbps"]
assert copy > 0 and j["header"]["copy_bytes"] == 16 << 20, j["header"]
assert len(j["rows"]) == 2, j["rows"]
for r in j["rows"]:
    assert r["kv_gbps"] > 0 and abs(r["vs_copy"] - r["kv_gbps"] / copy) <= 1e-6 * r["vs_copy"], r
print("json ok: copy %.1f GB/s, vs_copy %s" % (copy, [round(r["vs_copy"], 3) for r in j["rows"]]))
PY
then
  echo "FAIL: $json"
  fails=$((fails + 1))
fi
[ "$fails" -eq 0 ] || exit 1
echo "PASS"
