#!/usr/bin/env bash
# 51st session, call 2: the TMA kernel (call 1's cp.async kernel ran ~95 us at gate_up
# whatever the rows: its proxy fence before each wgmma is a MEMBAR that waits for the
# thread's loads in flight). GPU tests, per-linear timings (groups of 128 with the sweep,
# of 32), Nsight Compute on one call at 8 and 64 rows.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -x tests/test_int_wgmma.py -p no:cacheprovider --tb=short -m gpu -k "4096-128-64 or 4096-128-5" 2>&1 | tail -4
timeout 200 python3 benchmarks/int_wgmma_bench.py "$OUT/wgmma-g128.json" --groups 128 --sweep \
  > "$OUT/wgmma-g128.log" 2>&1; grep -E "kiln|wgmma |failed" "$OUT/wgmma-g128.log" | head -50; tail -6 "$OUT/wgmma-g128.log"
timeout 100 python3 benchmarks/int_wgmma_bench.py "$OUT/wgmma-g32.json" --groups 32 --rows 8,64 \
  2>&1 | tail -3
M="smsp__inst_executed.sum,dram__bytes_read.sum"
for r in long_scoreboard short_scoreboard wait not_selected math_pipe_throttle barrier \
         mio_throttle lg_throttle no_instruction membar sleeping; do
  M="$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"; done
for rows in 8 64; do
  f="$OUT/ncu-$rows.txt"
  KILN_INT_WGMMA=1-64 timeout 90 ncu --clock-control none --profile-from-start off \
    --kernel-name-base function -k 'regex:^_w4' --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section SchedulerStats --metrics "$M" \
    python3 benchmarks/ncu_linear.py int4 $rows gate_up > "$f" 2>&1
  echo "--- ncu rows $rows"; grep -E "Duration|DRAM Throughput|Achieved Occupancy|No Eligible|inst_executed.sum|stalled_" "$f" \
    | sed 's/  */ /g; s/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//'
done
timeout 150 python3 -m pytest -q tests/test_int_wgmma.py -p no:cacheprovider --tb=short -m gpu \
  2>&1 | tail -4
