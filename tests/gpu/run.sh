#!/usr/bin/env bash
# Builds disco on a GPU machine (Release, sm_90) and runs the GPU backends:
# the bit-exact suite (test_nccl) on 2 GPUs and on all GPUs, once under
# compute-sanitizer memcheck (small sizes), for nccl and then for nccl_device
# (DISCO_TEST_BACKEND=nccl_device, plus racecheck and test_nd: CUDA graph
# replays, a rank that skips a call), then the disco-bench sweep with both
# backends side by side. Logs go to $OUT (at most 8 files).
# usage: tests/gpu/run.sh [all|test|nd|python|bench]   (env: OUT, BUILD, JOBS,
#        QUICK=1: no sanitizer runs in nd)
# (nd: only the nccl_device part of `test`, with memcheck and racecheck of
# the plain and pipelined kernels)
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
ND="$BUILD/tests/gpu/test_nd"
B="$BUILD/tools/disco-bench/disco-bench"
fails=0
BW="" # disco-bench world: all GPUs unless the all-GPU suite failed
# nccl backend: every segment of at least 1 byte in up to 3 pipelined pieces
PIECES="DISCO_NCCL_SPLIT_BYTES=1 DISCO_NCCL_DISPATCH_CHUNKS=3 DISCO_NCCL_COMBINE_CHUNKS=3"

# step NAME LOG LIMIT CMD...: runs CMD under `timeout LIMIT`, appends its output
# to LOG, notes rc, seconds, the sanitizer summary if any and the last line,
# shows this run's FAIL lines and counts a failure. Returns CMD's rc.
step() {
  local name=$1 log=$2 lim=$3 tmp rc sum t0=$SECONDS
  shift 3
  tmp=$(mktemp)
  echo "### $name: $*" >> "$log"
  timeout "$lim" "$@" > "$tmp" 2>&1; rc=$?
  cat "$tmp" >> "$log"
  sum=$(grep -m1 'ERROR SUMMARY' "$tmp")
  note "$name: rc=$rc ($((SECONDS - t0)) s): ${sum:+$sum }$(tail -1 "$tmp")"
  if [ $rc -ne 0 ]; then
    fails=$((fails + 1))
    grep -m 30 -E 'FAIL|=+ (Invalid|Race|Error|Warning|Program)' "$tmp"
    [ $rc -eq 124 ] && note "$name: hung (killed after $lim s)"
  fi
  rm -f "$tmp"
  return $rc
}

if [ "$STAGE" = all ] || [ "$STAGE" = test ]; then
  t0=$SECONDS
  timeout 90 "$T" --world 2 > "$OUT/test.log" 2>&1; rc=$?
  note "test W=2: rc=$rc ($((SECONDS - t0)) s): $(tail -1 "$OUT/test.log")"
  [ $rc -ne 0 ] && fails=$((fails + 1)) && grep -m 30 FAIL "$OUT/test.log"
  if [ $rc -eq 124 ]; then note "test hung: stopping"; tail -20 "$OUT/test.log"; exit 1; fi
  # Same suite with every peer segment sent in up to 3 pipelined pieces in
  # dispatch and combine (PIECES; by default only segments of 32 MiB and up
  # are cut, in two, which the test cases never reach).
  t0=$SECONDS
  env $PIECES timeout 90 "$T" --world 2 >> "$OUT/test.log" 2>&1; rc=$?
  note "test W=2 pieces: rc=$rc ($((SECONDS - t0)) s): $(tail -1 "$OUT/test.log")"
  [ $rc -ne 0 ] && fails=$((fails + 1)) && grep FAIL "$OUT/test.log" | head -30
  # Same suite with registered payload buffers (NCCL's zero-copy sends;
  # RANK_MAJOR goes through the workspace).
  t0=$SECONDS
  DISCO_NCCL_REGISTER=1 timeout 90 "$T" --world 2 >> "$OUT/test.log" 2>&1; rc=$?
  note "test W=2 registered: rc=$rc ($((SECONDS - t0)) s): $(tail -1 "$OUT/test.log")"
  [ $rc -ne 0 ] && fails=$((fails + 1)) && grep FAIL "$OUT/test.log" | head -30
  t0=$SECONDS
  env DISCO_NCCL_REGISTER=1 $PIECES timeout 90 "$T" --world 2 >> "$OUT/test.log" 2>&1; rc=$?
  note "test W=2 registered pieces: rc=$rc ($((SECONDS - t0)) s): $(tail -1 "$OUT/test.log")"
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
      env $PIECES timeout 90 "$T" --world "$NGPU" >> "$OUT/test.log" 2>&1; rc=$?
      note "test W=$NGPU pieces: rc=$rc ($((SECONDS - t0)) s): $(tail -1 "$OUT/test.log")"
      [ $rc -ne 0 ] && fails=$((fails + 1)) && BW="-w 2" && grep FAIL "$OUT/test.log" | head -30
    fi
  fi
  t0=$SECONDS
  env $PIECES timeout 100 compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 3 "$T" --world 2 --small \
    > "$OUT/memcheck.log" 2>&1; rc=$?
  note "memcheck W=2 --small pieces: rc=$rc ($((SECONDS - t0)) s): $(grep -m1 'ERROR SUMMARY' "$OUT/memcheck.log") $(tail -1 "$OUT/memcheck.log")"
  [ $rc -ne 0 ] && fails=$((fails + 1))
fi

if [ "$STAGE" = all ] || [ "$STAGE" = test ] || [ "$STAGE" = nd ]; then
  # nccl_device: the same bit-exact table (errors found on the device read
  # through disco_comm_check), sanitizers at W=2 (racecheck: intra-GPU shared
  # memory hazards, a few cases), then test_nd (graph replays, skip-a-call).
  step "nccl_device test W=2" "$OUT/test.log" 90 env DISCO_TEST_BACKEND=nccl_device "$T" --world 2
  if [ "$NGPU" -gt 2 ]; then
    step "nccl_device test W=$NGPU" "$OUT/test.log" 90 env DISCO_TEST_BACKEND=nccl_device \
      "$T" --world "$NGPU"
  fi
  # A row (token) per warp at every size in the expand and both combine folds
  # (the expand's mode for many rows), on the whole table (DISCO_ND_TUNE bits,
  # src/cuda/nd_kernels.h).
  step "nccl_device test W=$NGPU warp rows" "$OUT/test.log" 90 env DISCO_TEST_BACKEND=nccl_device \
    DISCO_ND_TUNE=28 "$T" --world "$NGPU"
  # Warp rows in uneven pieces (the default is whole rows), pipelined, and the
  # small-batch kernel on a grid of 3 blocks (its default: a block per SM).
  step "nccl_device test W=$NGPU warp rows in 3 pieces, pipelined" "$OUT/test.log" 90 env \
    DISCO_TEST_BACKEND=nccl_device DISCO_ND_TUNE=16 DISCO_ND_WARP_PIECES=3 \
    DISCO_ND_PIPE_MIN_TOKENS=1 "$T" --world "$NGPU"
  step "nccl_device test W=$NGPU small kernel on 3 blocks" "$OUT/test.log" 90 env \
    DISCO_TEST_BACKEND=nccl_device DISCO_ND_SMALL_BLOCKS=3 "$T" --world "$NGPU"
  # The pipelined dispatch (many tokens by default) at every size, and mixed
  # with the plain one (ranks with fewer tokens than the threshold).
  step "nccl_device test W=$NGPU pipelined" "$OUT/test.log" 90 env DISCO_TEST_BACKEND=nccl_device \
    DISCO_ND_PIPE_MIN_TOKENS=1 "$T" --world "$NGPU"
  # Chunk flags of the pipelined dispatch at their smallest (64 rows: many
  # per source), so the expand waits chunk by chunk.
  step "nccl_device test W=$NGPU pipelined, dispatch chunks of 64 rows" "$OUT/test.log" 90 env \
    DISCO_TEST_BACKEND=nccl_device DISCO_ND_PIPE_MIN_TOKENS=1 DISCO_ND_DCHUNK_ROWS=64 \
    DISCO_ND_DCHUNK_MIN_KB=0 "$T" --world "$NGPU"
  step "nccl_device test W=$NGPU pipelined from 40 tokens" "$OUT/test.log" 90 env \
    DISCO_TEST_BACKEND=nccl_device DISCO_ND_PIPE_MIN_TOKENS=40 "$T" --world "$NGPU"
  step "nccl_device test W=$NGPU pipelined in 3 parts, mixed with plain" "$OUT/test.log" 90 env \
    DISCO_TEST_BACKEND=nccl_device DISCO_ND_PIPE_MIN_TOKENS=40 DISCO_ND_PIPE_PARTS=3 \
    "$T" --world "$NGPU"
  step "nccl_device own-slot late W=$NGPU pipelined" "$OUT/test.log" 90 env \
    DISCO_TEST_BACKEND=nccl_device DISCO_ND_PIPE_MIN_TOKENS=1 DISCO_ND_TEST_SELF_DELAY_US=3000 \
    "$T" --world "$NGPU" --filter basic
  step "test_nd (graph, timeout) W=$NGPU pipelined" "$OUT/test.log" 150 env \
    DISCO_ND_PIPE_MIN_TOKENS=1 "$ND"
  # The pipelined combine (chunk flags, token side folding as chunks land) at
  # every size, with the smallest chunks (many per owner even in small
  # cases); mixed with the plain one (from 40 tokens: some ranks each way);
  # with no block starting on the token side and a row/token per warp.
  step "nccl_device test W=$NGPU pipelined combine" "$OUT/test.log" 90 env \
    DISCO_TEST_BACKEND=nccl_device DISCO_ND_CPIPE_MIN_TOKENS=1 DISCO_ND_CHUNK_ROWS=64 \
    "$T" --world "$NGPU"
  step "nccl_device test W=$NGPU pipelined combine from 40 tokens" "$OUT/test.log" 90 env \
    DISCO_TEST_BACKEND=nccl_device DISCO_ND_CPIPE_MIN_TOKENS=40 "$T" --world "$NGPU"
  step "nccl_device test W=$NGPU pipelined combine, warp rows, no token blocks" \
    "$OUT/test.log" 90 env DISCO_TEST_BACKEND=nccl_device DISCO_ND_CPIPE_MIN_TOKENS=1 \
    DISCO_ND_CHUNK_ROWS=64 DISCO_ND_CTOKEN_PCT=0 DISCO_ND_TUNE=28 "$T" --world "$NGPU"
  step "nccl_device own-slot late W=$NGPU pipelined combine" "$OUT/test.log" 90 env \
    DISCO_TEST_BACKEND=nccl_device DISCO_ND_CPIPE_MIN_TOKENS=1 DISCO_ND_CTOKEN_PCT=50 \
    DISCO_ND_TEST_SELF_DELAY_US=3000 "$T" --world "$NGPU" --filter basic
  step "test_nd (graph, timeout) W=$NGPU pipelined combine" "$OUT/test.log" 150 env \
    DISCO_ND_CPIPE_MIN_TOKENS=1 "$ND"
  # Hybrid comms (pretend hosts, DISCO_ND_HOST_PEERS): NCCL send/recv to the
  # peers on the other one inside each call; the same table must pass.
  step "nccl_device hybrid, rank 1 on another host W=$NGPU" "$OUT/test.log" \
    120 env DISCO_TEST_BACKEND=nccl_device DISCO_ND_HOST_PEERS=0x2 "$T" --world "$NGPU"
  if [ "$NGPU" -ge 4 ]; then
    step "nccl_device hybrid, two hosts of 2 W=4" "$OUT/test.log" 120 env \
      DISCO_TEST_BACKEND=nccl_device DISCO_ND_HOST_PEERS=0x3 "$T" --world 4
  fi
  step "nccl_device hybrid, no NVLink peer W=2" "$OUT/test.log" 120 env \
    DISCO_TEST_BACKEND=nccl_device DISCO_ND_HOST_PEERS=0x2 "$T" --world 2
  step "nccl_device hybrid own-slot late W=$NGPU" "$OUT/test.log" 90 env \
    DISCO_TEST_BACKEND=nccl_device DISCO_ND_HOST_PEERS=0x5 DISCO_ND_TEST_SELF_DELAY_US=3000 \
    "$T" --world "$NGPU" --filter basic
  # Rank 0 stores what it sends to itself 3 ms late: outputs must still be
  # exact (regression test of the own-slot ordering fix; before it, rank 0
  # expanded its own tokens as soon as its peers' flags had arrived).
  step "nccl_device own-slot late W=$NGPU" "$OUT/test.log" 90 env DISCO_TEST_BACKEND=nccl_device \
    DISCO_ND_TEST_SELF_DELAY_US=3000 "$T" --world "$NGPU" --filter basic
  if [ -z "${QUICK:-}" ]; then
    step "nccl_device memcheck W=2 --small" "$OUT/memcheck.log" 150 env DISCO_TEST_BACKEND=nccl_device \
      compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 3 "$T" --world 2 --small
    step "nccl_device memcheck W=2 --small hybrid" "$OUT/memcheck.log" 150 env \
      DISCO_TEST_BACKEND=nccl_device DISCO_ND_HOST_PEERS=0x2 compute-sanitizer --tool memcheck \
      --report-api-errors no --error-exitcode 3 "$T" --world 2 --small
    step "nccl_device memcheck W=2 --small pipelined" "$OUT/memcheck.log" 150 env \
      DISCO_TEST_BACKEND=nccl_device DISCO_ND_PIPE_MIN_TOKENS=1 DISCO_ND_DCHUNK_ROWS=64 \
      DISCO_ND_DCHUNK_MIN_KB=0 compute-sanitizer --tool memcheck \
      --report-api-errors no --error-exitcode 3 "$T" --world 2 --small
    step "nccl_device racecheck W=2 --small basic" "$OUT/memcheck.log" 200 env DISCO_TEST_BACKEND=nccl_device \
      compute-sanitizer --tool racecheck --report-api-errors no --error-exitcode 3 "$T" --world 2 --small \
      --filter basic
    step "nccl_device racecheck W=2 --small basic pipelined" "$OUT/memcheck.log" 200 env \
      DISCO_TEST_BACKEND=nccl_device DISCO_ND_PIPE_MIN_TOKENS=1 DISCO_ND_DCHUNK_ROWS=64 \
      DISCO_ND_DCHUNK_MIN_KB=0 compute-sanitizer --tool racecheck \
      --report-api-errors no --error-exitcode 3 "$T" --world 2 --small --filter basic
    step "nccl_device memcheck W=2 --small pipelined combine" "$OUT/memcheck.log" 150 env \
      DISCO_TEST_BACKEND=nccl_device DISCO_ND_CPIPE_MIN_TOKENS=1 DISCO_ND_CHUNK_ROWS=64 \
      compute-sanitizer --tool memcheck \
      --report-api-errors no --error-exitcode 3 "$T" --world 2 --small
    step "nccl_device racecheck W=2 --small basic pipelined combine" "$OUT/memcheck.log" 200 env \
      DISCO_TEST_BACKEND=nccl_device DISCO_ND_CPIPE_MIN_TOKENS=1 DISCO_ND_CHUNK_ROWS=64 \
      compute-sanitizer --tool racecheck \
      --report-api-errors no --error-exitcode 3 "$T" --world 2 --small --filter basic
  fi
  step "test_nd (graph, timeout) W=$NGPU" "$OUT/test.log" 150 "$ND"
fi

if [ "$STAGE" = all ] || [ "$STAGE" = python ]; then
  # The ctypes binding over the nccl backend, one process per GPU (torchrun).
  t0=$SECONDS
  DISCO_LIBRARY="$BUILD/libdisco.so" PYTHONPATH="$ROOT/python" PYTHONUNBUFFERED=1 \
    timeout 150 torchrun --nproc_per_node 2 "$ROOT/tests/gpu/test_python_gpu.py" \
    > "$OUT/python.log" 2>&1; rc=$?
  note "python binding W=2 (torchrun): rc=$rc ($((SECONDS - t0)) s): $(tail -1 "$OUT/python.log")"
  [ $rc -ne 0 ] && fails=$((fails + 1)) && tail -30 "$OUT/python.log"
  t0=$SECONDS
  # PyTorch loads its bundled libnccl first; the device API needs the one disco
  # was built against (docs/python.md), so preload that one.
  NCCL_LIB=$(ldd "$BUILD/libdisco.so" | awk '/libnccl/ {print $3; exit}')
  echo "# --- nccl_device (LD_PRELOAD=$NCCL_LIB)" >> "$OUT/python.log"
  LD_PRELOAD="$NCCL_LIB" DISCO_TEST_BACKEND=nccl_device DISCO_LIBRARY="$BUILD/libdisco.so" PYTHONPATH="$ROOT/python" \
    PYTHONUNBUFFERED=1 timeout 150 torchrun --nproc_per_node 2 \
    "$ROOT/tests/gpu/test_python_gpu.py" >> "$OUT/python.log" 2>&1; rc=$?
  note "python binding nccl_device W=2 (torchrun): rc=$rc ($((SECONDS - t0)) s): $(tail -1 "$OUT/python.log")"
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
  # nccl_device, one process per GPU (its windows mapped across processes).
  t0=$SECONDS
  echo "# --- nccl_device, mpirun" >> "$OUT/bench-mpi.txt"
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 90 \
    mpirun --allow-run-as-root -np "$NGPU" -x NCCL_NVLS_ENABLE "$B" --backend nccl_device \
    -t 128,4096 -H 7168 -k 1,8 -e 256 -d bf16 -l expert -n 20 -W 3 --check \
    >> "$OUT/bench-mpi.txt" 2>&1; rc=$?
  note "bench nccl_device mpirun -np $NGPU (checked): rc=$rc ($((SECONDS - t0)) s)"
  [ $rc -ne 0 ] && fails=$((fails + 1))
  cat "$OUT/bench-mpi.txt"
  t0=$SECONDS
  # The performance targets' shapes (H 7168, E 256, bf16, uniform), both wires,
  # nccl and nccl_device side by side (one row each per case). Should the pair
  # fail (nccl_device is new), nccl's table is rerun alone after it.
  timeout 150 "$B" --backend nccl,nccl_device $BW -t 128,4096 -H 7168 -k 1,8 -e 256 -d bf16 \
    -l expert,rank -r uniform -c fp32,dtype -n 30 -W 5 --no-check --json "$OUT/bench.json" \
    > "$OUT/bench.txt" 2>&1; rc=$?
  if [ $rc -ne 0 ]; then
    note "bench nccl,nccl_device: rc=$rc; nccl alone follows"
    echo "# --- nccl alone (the nccl,nccl_device run failed: rc=$rc)" >> "$OUT/bench.txt"
    timeout 120 "$B" --backend nccl $BW -t 128,4096 -H 7168 -k 1,8 -e 256 -d bf16 -l expert,rank \
      -r uniform -c fp32,dtype -n 30 -W 5 --no-check --json "$OUT/bench.json" \
      >> "$OUT/bench.txt" 2>&1
  fi
  echo "# --- same, EXPERT_MAJOR, nccl without pipelined pieces (DISCO_NCCL_*_CHUNKS=1)" >> "$OUT/bench.txt"
  DISCO_NCCL_DISPATCH_CHUNKS=1 DISCO_NCCL_COMBINE_CHUNKS=1 timeout 60 "$B" --backend nccl $BW -t 128,4096 -H 7168 \
    -k 1,8 -e 256 -d bf16 -l expert -r uniform -c fp32,dtype -n 30 -W 5 --no-check \
    >> "$OUT/bench.txt" 2>&1 || rc=$?
  timeout 60 "$B" --backend nccl,nccl_device $BW -t 4096 -H 4096 -k 2 -e 8 -d bf16 \
    -l expert,rank -r uniform -c fp32,dtype -n 30 -W 5 --no-check >> "$OUT/bench.txt" 2>&1 || rc=$?
  timeout 150 "$B" --backend nccl,nccl_device $BW -t 1024,4096 -H 7168 -k 8 -e 256 -d bf16 \
    -l expert,rank -r uniform,zipf:1.2 -c fp32,dtype -n 5 -W 2 --check >> "$OUT/bench.txt" 2>&1 || rc=$?
  note "bench: rc=$rc ($((SECONDS - t0)) s)"
  cat "$OUT/bench.txt"
fi
note "failures: $fails"
exit $fails
