#!/usr/bin/env bash
# 48th session, call 3: the integer kernels' GPU tests on the new launches; bf16 batch 1 on
# this card; the one-row GEMVs in a kept GGUF file's layouts, kiln's launch against the
# sweep's (cold weights): int4 in groups of 32 with offsets (Q4_0 / Q4_1 / Q4_K; the pairs
# GEMV) and int8 in groups of 16 with offsets (K-quant mixes; the float GEMV)
set -uo pipefail
OUT=${OUT:-gpu-out}
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -m gpu tests/test_kernels_int.py -k "gpu_int_linear" 2>&1 | tail -2
STAGE_TIMEOUT=100 bash benchmarks/gpu_suite.sh latency-b1 2>&1 | grep -E "===|kiln "
timeout 190 python3 benchmarks/int4_row_sweep.py "$OUT/row-int4-g32.json" --group 32 \
  --shapes gate_up,down,o > "$OUT/row-int4-g32.log" 2>&1
grep -E "^==|Error" "$OUT/row-int4-g32.log"
timeout 130 python3 benchmarks/int4_row_sweep.py "$OUT/row-int8-g16.json" --bits 8 --group 16 \
  --offsets --shapes gate_up,down > "$OUT/row-int8-g16.log" 2>&1
grep -E "^==|Error" "$OUT/row-int8-g16.log"
