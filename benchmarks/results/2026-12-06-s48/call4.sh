#!/usr/bin/env bash
# 48th session, call 4: the one-row launches for int4 g32 and int8 g16 (from call 3's
# sweep) as defaults: GPU tests (incl. the GLU / rotary epilogues that take the one-row
# launch), head_bench at one row against KILN_INT_GROUPED=step, INT4 g32 batch 1 end to end
set -uo pipefail
OUT=${OUT:-gpu-out}
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python3 -m pytest -q -m gpu tests/test_kernels_int.py tests/test_int4_glu.py \
  tests/test_int4_rope.py -k "gpu" 2>&1 | tail -2
for mode in groups step; do
  KILN_INT_GROUPED=$mode timeout 50 python3 benchmarks/head_bench.py "$OUT/rows1-$mode.json" \
    --rows 1 --layers --only g32,g16 > "$OUT/rows1-$mode.log" 2>&1
  grep -E "^layer|Error" "$OUT/rows1-$mode.log" | sed "s/^/[$mode] /"
done
STAGE_TIMEOUT=90 bash benchmarks/gpu_suite.sh q4g32:latency-b1 2>&1 | grep -E "===|kiln "
