#!/usr/bin/env bash
# 49th session, call 3: bf16 batch 1 with the swapped GEMV's first weight tile loaded before
# its PDL wait (KILN_SWAP_PRELOAD) off / on alternating, twice
set -uo pipefail
OUT=${OUT:-gpu-out}
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
for i in 1 2; do
  for on in 0 1; do
    KILN_SWAP_PRELOAD=$on RUN_TAG=-pre$on-$i STAGE_TIMEOUT=120 \
      bash benchmarks/gpu_suite.sh latency-b1 2>&1 | grep -E "===|kiln " | sed "s/^/[bf16 pre$on] /"
  done
done
