#!/usr/bin/env bash
# 51st session, call 2: the cp.async kernel ran ~95 us at gate_up whatever the rows (call 1).
# Per-linear timings of the TMA variant against it, the cp.async one without its proxy
# fence (a diagnostic: does the fence wait for the loads in flight?), then Nsight Compute
# on one call of each.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -x tests/test_int_wgmma.py -p no:cacheprovider --tb=short \
  -m gpu -k "fast and 6144 and (64 or 5)" 2>&1 | tail -5
timeout 150 python3 benchmarks/int_wgmma_bench.py "$OUT/wgmma.json" --groups 128 --rows 1,8,64 \
  2>&1 | tail -8
KILN_INT_WGMMA_FENCE=0 timeout 100 python3 benchmarks/int_wgmma_bench.py "$OUT/wgmma-nofence.json" \
  --groups 128 --rows 8 2>&1 | grep "cp.async\|layer\|G 128"
M="smsp__inst_executed.sum,dram__bytes_read.sum"
for r in long_scoreboard short_scoreboard wait not_selected math_pipe_throttle barrier \
         mio_throttle lg_throttle no_instruction membar sleeping; do
  M="$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"; done
for v in "1,128,128,1,3,1,1" "0,128,128,1,3,1,0"; do
  fence=${v%%,*}; cfg=${v#*,}; f="$OUT/ncu-$fence-${cfg//,/_}.txt"
  KILN_INT_WGMMA=1-64 KILN_INT_WGMMA_FENCE=$fence KILN_INT_WGMMA_CFG=$cfg timeout 100 ncu \
    --clock-control none --profile-from-start off --kernel-name-base function -k 'regex:^_w4' \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --metrics "$M" python3 benchmarks/ncu_linear.py int4 8 gate_up > "$f" 2>&1
  echo "--- fence $fence cfg $cfg"; grep -E "Duration|DRAM Throughput|Achieved Occupancy|No Eligible|Block Limit|inst_executed.sum|stalled_" "$f" \
    | sed 's/  */ /g; s/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//'
done
