#!/bin/sh
# Runs a command and passes only when it exits with the expected status and
# (for status 2) prints the usage text on stderr.
# usage: expect_exit.sh STATUS COMMAND [ARGS...]
expected=$1
shift
err=$(mktemp) || exit 1
"$@" >/dev/null 2>"$err"
rc=$?
status=0
if [ "$rc" -ne "$expected" ]; then
  echo "expected exit $expected, got $rc from: $*" >&2
  status=1
elif [ "$expected" -eq 2 ] && ! grep -q '^usage: disco-bench' "$err"; then
  echo "no usage text on stderr from: $*" >&2
  status=1
fi
cat "$err" >&2
rm -f "$err"
exit $status
