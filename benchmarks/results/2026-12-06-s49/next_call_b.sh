#!/usr/bin/env bash
# For the next device session (written in the 49th), call b of two (after next_call_a.sh):
# 1. KILN_INT8_PDL=1 (the one-row INT8 GEMV PDL-launched, its first K step before the
#    wait; int8_wo engines' small kernels PDL-launched too) against the default: int8_wo
#    and int8 g32 (GGUF Q8_0 layout) batch 1, INT4 with its 8-bit head, alternating twice
# 2. KILN_INT_EVEN=1 (mask-free whole tiles) against the default on cold weights, twice
# 3. INT4 g128 batch 1 with the preload (on an H200 this updates #10's 402.9)
# About 12 minutes in all: the first loop in one call, the rest in the next.
set -uo pipefail
OUT=${OUT:-gpu-out}
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
for i in 1 2; do
  for on in 0 1; do
    for q in int8w q8g32 int4; do
      KILN_INT8_PDL=$on RUN_TAG=-i8pdl$on-$i EXTRA_ARGS="--quantize-lm-head" STAGE_TIMEOUT=150 \
        bash benchmarks/gpu_suite.sh $q:latency-b1 2>&1 | grep -E "kiln " | sed "s/^/[$q int8pdl=$on] /"
    done
  done
done
for i in 1 2; do
  for even in 0 1; do
    KILN_INT_EVEN=$even timeout 150 python3 benchmarks/head_bench.py "$OUT/even$even-$i.json" \
      --rows 8,64 --layers --cold --only g32,g16 > "$OUT/even$even-$i.log" 2>&1
    grep -E "^layer|Error" "$OUT/even$even-$i.log" | sed "s/^/[even=$even] /"
  done
done
EXTRA_ARGS="--quantize-lm-head" STAGE_TIMEOUT=150 bash benchmarks/gpu_suite.sh int4:latency-b1 \
  2>&1 | grep -E "===|kiln "
