#!/usr/bin/env bash
# For the next device session (written in the 48th, not run: no device time left): call
# 4's checks of the one-row launches for int4 g32 / int8 g16 (GPU tests with the GLU and
# rotary epilogues, one row against KILN_INT_GROUPED=step, INT4 g32 and INT8 g32 batch 1),
# the layer tables on cold weights (head_bench --cold), and the sweeps not run: int8 g32
# (Q8_0) at one row
set -uo pipefail
OUT=${OUT:-gpu-out}
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache
bash benchmarks/results/2026-12-06-s48/call4.sh
STAGE_TIMEOUT=90 bash benchmarks/gpu_suite.sh q8g32:latency-b1 latency-b1 2>&1 | grep -E "===|kiln "
for mode in groups step; do
  KILN_INT_GROUPED=$mode timeout 150 python3 benchmarks/head_bench.py "$OUT/cold-$mode.json" \
    --rows 1,8,64 --layers --cold > "$OUT/cold-$mode.log" 2>&1
  grep -E "^layer|Error" "$OUT/cold-$mode.log" | sed "s/^/[$mode] /"
done
timeout 120 python3 benchmarks/int4_row_sweep.py "$OUT/row-int8-g32.json" --bits 8 --group 32 \
  --shapes gate_up,down,o > "$OUT/row-int8-g32.log" 2>&1
grep -E "^==|Error" "$OUT/row-int8-g32.log"
# the float tiles without masks on whole tiles (KILN_INT_EVEN=1, opt-in: 10.1 against 11.3
# SASS instructions a weight in int4 g32's K loop at 64 rows), on cold weights
KILN_INT_EVEN=1 timeout 150 python3 benchmarks/head_bench.py "$OUT/cold-even.json" \
  --rows 8,64 --layers --cold --only g32,g16 > "$OUT/cold-even.log" 2>&1
grep -E "^layer|Error" "$OUT/cold-even.log" | sed "s/^/[even] /"
