#!/usr/bin/env bash
# A/B of nccl_device kernel variants on one machine: disco-bench at the
# issue-6 shapes once per DISCO_ND_TUNE value, with DISCO_ND_TRACE=1 phase
# timings (rank 0..W-1 lines), all into one file.
# usage: tests/gpu/tune.sh OUTFILE [VARIANT...]
#        (env: BUILD, SHAPES="-t ... -k ...", SHAPES2: a second set, default
#        the H 4096 K 2 E 8 case, "none" to skip; BENCH_ARGS: more options;
#        BACKEND (nccl_device), LAYOUTS (expert))
# A variant is a DISCO_ND_TUNE value, or NAME=value[,NAME=value...] settings.
set -u -o pipefail
OUTF=$1
shift
BUILD=${BUILD:-/tmp/disco-build-gpu}
B="$BUILD/tools/disco-bench/disco-bench"
export NCCL_NVLS_ENABLE=0
: > "$OUTF"
for v in "${@:-0}"; do
  case $v in
    *=*) vars=${v//,/ } ;;
    *) vars="DISCO_ND_TUNE=$v" ;;
  esac
  for shape in "${SHAPES:--t 32,128,1024,4096 -H 7168 -k 1,8 -e 256}" "${SHAPES2:--t 4096 -H 4096 -k 2 -e 8}"; do
    [ "$shape" = none ] && continue
    echo "### $vars $shape" >> "$OUTF"
    # shellcheck disable=SC2086
    env $vars DISCO_ND_TRACE=1 DISCO_BENCH_HOST_US=1 timeout 120 "$B" --backend "${BACKEND:-nccl_device}" \
      $shape -d bf16 -l "${LAYOUTS:-expert}" -r uniform -c dtype -n 30 -W 5 --no-check ${BENCH_ARGS:-} \
      >> "$OUTF" 2>&1 ||
      echo "### rc=$?" >> "$OUTF"
  done
done
# the table rows of every variant, then each case's traces (slowest phases)
grep -E '^###|^ +[0-9]' "$OUTF"
