#!/bin/sh
# Usage: bench_comm_cli.sh <distattn-bench>
# `distattn-bench comm` rejects bad command lines with a message saying what to type.
set -u
bench=$1
sub=comm
fails=0
. "$(dirname "$0")/cli_expect.sh"
expect "size '99999999999G' does not fit in 64 bits" -b 99999999999G
expect "size '99999999999999999999999' does not fit in 64 bits" -e 99999999999999999999999
expect "bad size '-1'" -b -1
expect "bad size '12Q'" -e 12Q
expect "all_reduce: no size in the sweep (-b 3 -e 3) holds one fp64 element (8 bytes); use -e 8" \
  -b 3 -e 3 -d fp64 --op all_reduce
expect "use --backend mpi" --backend nccl
[ "$fails" -eq 0 ] || exit 1
echo "PASS"
