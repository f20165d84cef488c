#!/usr/bin/env bash
# 48th session, call 1: decode-batch tiles whose K step spans several quantization groups
# (GROUPS, KILN_INT_GROUPED=groups, the new default) against the group as the step (step,
# the launch before) and every element's scale gathered (gather), at the GGUF layouts; a
# KILN_INT_TILES sweep of the new mode; the integer kernels' GPU tests
set -uo pipefail
OUT=${OUT:-gpu-out}
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/card.txt"
timeout 200 python3 -m pytest -q -m gpu tests/test_kernels_int.py -k "gpu_int_linear" 2>&1 \
  | tail -4 | tee "$OUT/tests.log"
for mode in step groups gather; do
  KILN_INT_GROUPED=$mode timeout 120 python3 benchmarks/head_bench.py "$OUT/layers-$mode.json" \
    --rows 1,8,16,64 --layers --only g32,g16 > "$OUT/layers-$mode.log" 2>&1
  grep -E "^layer|Error" "$OUT/layers-$mode.log" | sed "s/^/[$mode] /"
done
for cfg in "32,128,4,3,2" "32,256,4,3,1" "64,128,4,3,2" "64,256,4,3,1" "32,128,4,4,2" \
           "64,64,4,4,2" "128,128,8,3,2" "64,128,4,3,2,0,0,0,0,1" "128,128,4,3,2,0,0,0,0,1"; do
  KILN_INT_TILES=$cfg timeout 90 python3 benchmarks/head_bench.py "$OUT/tiles-${cfg//,/_}.json" \
    --rows 8,64 --layers --only g32,g16 > "$OUT/tiles-${cfg//,/_}.log" 2>&1
  grep -E "^layer|Error" "$OUT/tiles-${cfg//,/_}.log" | grep -v bf16 | sed "s/^/[$cfg] /"
done
