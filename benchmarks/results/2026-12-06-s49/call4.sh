#!/usr/bin/env bash
# 49th session, call 4: KILN_INT_PRELOAD=2 (the first two K steps loaded before the PDL wait)
# against 1 and 0: the GPU test, INT4 g128 batch 1 (head in 8 bits) alternating twice, and
# the GGUF Q4 layout (int4 g32) off / on
set -uo pipefail
OUT=${OUT:-gpu-out}
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_int_pairs.py \
  -k "pdl" 2>&1 | tail -2
for i in 1 2; do
  for n in 0 1 2; do
    KILN_INT_PRELOAD=$n RUN_TAG=-pre$n-$i EXTRA_ARGS="--quantize-lm-head" STAGE_TIMEOUT=120 \
      bash benchmarks/gpu_suite.sh int4:latency-b1 2>&1 | grep -E "kiln " | sed "s/^/[int4 pre$n] /"
  done
done
for n in 0 1; do
  KILN_INT_PRELOAD=$n RUN_TAG=-pre$n STAGE_TIMEOUT=150 bash benchmarks/gpu_suite.sh \
    q4g32:latency-b1 2>&1 | grep -E "kiln " | sed "s/^/[q4g32 pre$n] /"
done
