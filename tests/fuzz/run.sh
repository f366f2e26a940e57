#!/usr/bin/env bash
# Builds fuzz_dispatch with clang in build-fuzz and fuzzes for a bounded time.
# Usage: tests/fuzz/run.sh [SECONDS=60] [extra libFuzzer args...]
# Exits non-zero if libFuzzer finds a crash, a failed check or a leak; the
# reproducer (crash-*) is left in the working directory printed at the end.
set -euo pipefail

seconds="${1:-60}"
shift || true
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${root}/build-fuzz"

cmake -S "${root}" -B "${build}" -DCMAKE_C_COMPILER=clang -DDISCO_FUZZ=ON \
  -DDISCO_WITH_MPI=OFF -DDISCO_WITH_NCCL=OFF -DDISCO_WERROR=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "${build}" --target fuzz_dispatch -j "$(nproc)"

corpus="$(mktemp -d "${TMPDIR:-/tmp}/disco-fuzz-corpus.XXXXXX")"
artifacts="$(mktemp -d "${TMPDIR:-/tmp}/disco-fuzz-artifacts.XXXXXX")"
echo "fuzzing for ${seconds} s; corpus ${corpus}, crashes to ${artifacts}"
# -timeout: a single input taking this long is a hang (the library's own
# timeout_ms is 5 s in the target, so a deadlock turns into a failed check).
status=0
"${build}/tests/fuzz/fuzz_dispatch" "${corpus}" -max_total_time="${seconds}" \
  -timeout=30 -max_len=4096 -artifact_prefix="${artifacts}/" -print_final_stats=1 "$@" ||
  status=$?
if [[ ${status} -ne 0 ]]; then
  echo "fuzz_dispatch FAILED (exit ${status}); reproducers in ${artifacts}:" >&2
  ls -l "${artifacts}" >&2 || true
  exit 1
fi
rm -rf "${corpus}" "${artifacts}"
echo "fuzz_dispatch: no failures in ${seconds} s"
