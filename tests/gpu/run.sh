#!/usr/bin/env bash
# Builds disco on a GPU machine (Release, sm_90) and runs the NCCL backend:
# the bit-exact suite on 2 GPUs and on all GPUs, once under compute-sanitizer
# memcheck (small sizes), then the disco-bench sweep. Logs go to $OUT (at most
# 8 files). usage: tests/gpu/run.sh [all|test|python|bench]   (env: OUT, BUILD, JOBS)
set -u -o pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/disco-gpu-out}
BUILD=${BUILD:-/tmp/disco-build-gpu}
JOBS=${JOBS:-16}
STAGE=${1:-all}
export NCCL_NVLS_ENABLE=0 # never NVLink multicast
mkdir -p "$OUT"
SUM="$OUT/summary.txt"
: > "$SUM"
note() { echo "$*" | tee -a "$SUM"; }

{ date -u; nvidia-smi -L; nvidia-smi topo -m; nvcc --version | tail -2; } >> "$SUM" 2>&1
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
note "GPUs: $NGPU ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"

t0=$SECONDS
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DDISCO_CUDA_ARCH=90 > "$OUT/build.log" 2>&1 &&
  cmake --build "$BUILD" -j"$JOBS" >> "$OUT/build.log" 2>&1
rc=$?
note "build: rc=$rc ($((SECONDS - t0)) s)"
if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; exit 1; fi
T="$BUILD/tests/gpu/test_nccl"
B="$BUILD/tools/disco-bench/disco-bench"
fails=0
BW="" # disco-bench world: all GPUs unless the all-GPU suite failed

if [ "$STAGE" = all ] || [ "$STAGE" = test ]; then
  t0=$SECONDS
  timeout 90 "$T" --world 2 > "$OUT/test.log" 2>&1; rc=$?
  note "test W=2: rc=$rc ($((SECONDS - t0)) s): $(tail -1 "$OUT/test.log")"
  [ $rc -ne 0 ] && fails=$((fails + 1)) && grep -m 30 FAIL "$OUT/test.log"
  if [ $rc -eq 124 ]; then note "test hung: stopping"; tail -20 "$OUT/test.log"; exit 1; fi
  # Same suite with every peer segment sent in two pipelined halves (the
  # default splits only segments >= 4 MiB, which the small cases never reach).
  t0=$SECONDS
  DISCO_NCCL_SPLIT_BYTES=1 timeout 90 "$T" --world 2 >> "$OUT/test.log" 2>&1; rc=$?
  note "test W=2 split-all: rc=$rc ($((SECONDS - t0)) s): $(tail -1 "$OUT/test.log")"
  [ $rc -ne 0 ] && fails=$((fails + 1)) && grep FAIL "$OUT/test.log" | head -30
  t0=$SECONDS
  timeout 60 "$T" --world 1 --small >> "$OUT/test.log" 2>&1; rc=$?
  note "test W=1 --small: rc=$rc ($((SECONDS - t0)) s): $(tail -1 "$OUT/test.log")"
  [ $rc -ne 0 ] && fails=$((fails + 1))
  if [ "$NGPU" -gt 2 ]; then
    t0=$SECONDS
    timeout 90 "$T" --world "$NGPU" >> "$OUT/test.log" 2>&1; rc=$?
    note "test W=$NGPU: rc=$rc ($((SECONDS - t0)) s): $(tail -1 "$OUT/test.log")"
    [ $rc -ne 0 ] && fails=$((fails + 1)) && BW="-w 2" && grep FAIL "$OUT/test.log" | head -30
    if [ $rc -ne 124 ]; then
      t0=$SECONDS
      DISCO_NCCL_SPLIT_BYTES=1 timeout 90 "$T" --world "$NGPU" >> "$OUT/test.log" 2>&1; rc=$?
      note "test W=$NGPU split-all: rc=$rc ($((SECONDS - t0)) s): $(tail -1 "$OUT/test.log")"
      [ $rc -ne 0 ] && fails=$((fails + 1)) && BW="-w 2" && grep FAIL "$OUT/test.log" | head -30
    fi
  fi
  t0=$SECONDS
  DISCO_NCCL_SPLIT_BYTES=1 timeout 100 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 3 "$T" --world 2 --small \
    > "$OUT/memcheck.log" 2>&1; rc=$?
  note "memcheck W=2 --small split-all: rc=$rc ($((SECONDS - t0)) s): $(grep -m1 'ERROR SUMMARY' "$OUT/memcheck.log") $(tail -1 "$OUT/memcheck.log")"
  [ $rc -ne 0 ] && fails=$((fails + 1))
fi

if [ "$STAGE" = all ] || [ "$STAGE" = python ]; then
  # The ctypes binding over the nccl backend, one process per GPU (torchrun).
  t0=$SECONDS
  DISCO_LIBRARY="$BUILD/libdisco.so" PYTHONPATH="$ROOT/python" PYTHONUNBUFFERED=1 \
    timeout 150 torchrun --nproc_per_node 2 "$ROOT/tests/gpu/test_python_gpu.py" \
    > "$OUT/python.log" 2>&1; rc=$?
  note "python binding W=2 (torchrun): rc=$rc ($((SECONDS - t0)) s): $(tail -1 "$OUT/python.log")"
  [ $rc -ne 0 ] && fails=$((fails + 1)) && tail -30 "$OUT/python.log"
fi

if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  # One process per GPU under mpirun (the multi-process path), checked.
  t0=$SECONDS
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 90 \
    mpirun --allow-run-as-root -np "$NGPU" -x NCCL_NVLS_ENABLE "$B" --backend nccl \
    -t 128,4096 -H 7168 -k 1,8 -e 256 -d bf16 -l expert -n 20 -W 3 --check \
    > "$OUT/bench-mpi.txt" 2>&1; rc=$?
  note "bench mpirun -np $NGPU (checked): rc=$rc ($((SECONDS - t0)) s)"
  [ $rc -ne 0 ] && fails=$((fails + 1))
  cat "$OUT/bench-mpi.txt"
  t0=$SECONDS
  # The performance targets' shapes (H 7168, E 256, bf16, uniform), both wires.
  timeout 120 "$B" --backend nccl $BW -t 128,4096 -H 7168 -k 1,8 -e 256 -d bf16 -l expert,rank \
    -r uniform -c fp32,dtype -n 30 -W 5 --no-check --json "$OUT/bench.json" \
    > "$OUT/bench.txt" 2>&1; rc=$?
  echo "# --- same, EXPERT_MAJOR, combine without pipelined halves (DISCO_NCCL_SPLIT_BYTES=huge)" >> "$OUT/bench.txt"
  DISCO_NCCL_SPLIT_BYTES=1000000000000 timeout 60 "$B" --backend nccl $BW -t 128,4096 -H 7168 \
    -k 1,8 -e 256 -d bf16 -l expert -r uniform -c fp32,dtype -n 30 -W 5 --no-check \
    >> "$OUT/bench.txt" 2>&1 || rc=$?
  timeout 45 "$B" --backend nccl $BW -t 4096 -H 4096 -k 2 -e 8 -d bf16 -l expert,rank \
    -r uniform -c fp32,dtype -n 30 -W 5 --no-check >> "$OUT/bench.txt" 2>&1 || rc=$?
  timeout 90 "$B" --backend nccl $BW -t 1024,4096 -H 7168 -k 8 -e 256 -d bf16 -l expert,rank \
    -r uniform,zipf:1.2 -c fp32,dtype -n 5 -W 2 --check >> "$OUT/bench.txt" 2>&1 || rc=$?
  note "bench: rc=$rc ($((SECONDS - t0)) s)"
  cat "$OUT/bench.txt"
fi
note "failures: $fails"
exit $fails
