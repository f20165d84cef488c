#!/usr/bin/env bash
# For the next device session, on an H200 (`run` with kind nvidia-h200), so the numbers
# compare with BENCHMARKS.md's #10 rows: batch 1 (128 in / 256 out) of bf16, INT4 g128 and
# int8_wo (8-bit heads, as #10's targets are measured) and the GGUF layouts (int4 / int8
# in groups of 32) on today's defaults (the INT4 GEMV's first step before its PDL wait,
# 49th; the INT8 GEMV PDL-launched, 50th), each twice, alternating. About 8 minutes.
set -uo pipefail
OUT=${OUT:-gpu-out}
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
for i in 1 2; do
  for q in bf16 int4 int8w q4g32 q8g32; do
    spec=$q:latency-b1 args="--quantize-lm-head"
    [ $q = bf16 ] && spec=latency-b1 args=""
    RUN_TAG=-$i EXTRA_ARGS="$args" STAGE_TIMEOUT=150 bash benchmarks/gpu_suite.sh $spec 2>&1 \
      | grep -E "kiln |rror" | sed "s/^/[$q $i] /" | tee -a "$OUT/b1.log"
  done
done
