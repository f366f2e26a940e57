#!/usr/bin/env bash
# The main job: disco-bench on the best backend present. NCCL when the build
# has it and 2 or more GPUs are visible, otherwise the built-in local backend
# (threads of one process), which runs anywhere.
set -euo pipefail
build=${1:-build}
bench="$build/tools/disco-bench/disco-bench"
[ -x "$bench" ] || { echo "demo: $bench not built" >&2; exit 1; }

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$gpus" -ge 2 ] && grep -q '^nccl=ON' "$build/disco_features.txt" 2>/dev/null; then
  echo "demo: $gpus GPUs found: nccl backend, one thread per GPU"
  exec "$bench" --backend nccl -w "$gpus" -t 128,4096 -H 7168 -k 1,8 -e 256 -d bf16 \
    --iters 50 --warmup 10
fi
echo "demo: no GPUs (or no NCCL in this build): local backend, 4 ranks as threads"
exec "$bench" --backend local -w 4 -t 128,1024 -H 1024 -k 1,8 -e 64 -d bf16,fp32 \
  --layout expert,rank --iters 10 --warmup 2
