# Sourced by the distattn-bench CLI tests. Needs $bench (the binary) and $sub (the
# subcommand); counts failures in $fails.
# expect <message substring> <args...>: `$bench $sub args...` must exit non-zero and print it.
fails=${fails:-0}
expect() {
  want=$1
  shift
  out=$("$bench" "$sub" "$@" 2>&1)
  rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "FAIL: '$sub $*' exited 0"
    fails=$((fails + 1))
  elif ! printf '%s\n' "$out" | grep -qF -- "$want"; then
    echo "FAIL: '$sub $*' output lacks '$want':"
    printf '%s\n' "$out"
    fails=$((fails + 1))
  else
    echo "ok: $sub $* -> $want"
  fi
}
