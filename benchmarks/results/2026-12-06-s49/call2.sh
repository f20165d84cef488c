#!/usr/bin/env bash
# 49th session, call 2: the first K step's weights loaded before the PDL wait in the one-row
# INT4 GEMV (KILN_INT_PRELOAD) and the swapped bf16 GEMV (KILN_SWAP_PRELOAD): their GPU
# tests (bits against the plain launch in a replayed CUDA graph), then INT4 g128 batch 1
# (head in 8 bits, as #10's target) off / on alternating, twice
set -uo pipefail
OUT=${OUT:-gpu-out}
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_int_pairs.py \
  tests/test_gemv_swap_epilogues.py -k "pdl" 2>&1 | tail -3
for i in 1 2; do
  for on in 0 1; do
    KILN_INT_PRELOAD=$on RUN_TAG=-pre$on-$i EXTRA_ARGS="--quantize-lm-head" STAGE_TIMEOUT=120 \
      bash benchmarks/gpu_suite.sh int4:latency-b1 2>&1 | grep -E "===|kiln " | sed "s/^/[int4 pre$on] /"
  done
done
