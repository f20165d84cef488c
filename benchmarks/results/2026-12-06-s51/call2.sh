#!/usr/bin/env bash
# 51st session, call 2 (third try): the TMA kernel. Nsight Compute on one gate_up call at
# 8 and 64 rows (groups of 128), the per-linear timings with the sweep, the GPU tests.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
M="smsp__inst_executed.sum,dram__bytes_read.sum"
for r in long_scoreboard short_scoreboard wait not_selected math_pipe_throttle barrier \
         mio_throttle lg_throttle no_instruction membar sleeping; do
  M="$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"; done
for rows in 8 64; do for ar in 0 1; do
  f="$OUT/ncu-$rows-$ar.txt"
  KILN_INT_WGMMA=1-64 KILN_INT_WGMMA_CFG=128,128,1,3,1,$ar timeout 90 ncu --clock-control none \
    --profile-from-start off \
    --kernel-name-base function -k 'regex:^_w4' --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section SchedulerStats --section SourceCounters --metrics "$M" \
    python3 benchmarks/ncu_linear.py int4 $rows gate_up > "$f" 2>&1
  echo "--- ncu rows $rows a_regs $ar"; grep -E "Duration|DRAM Throughput|Achieved Occupancy|No Eligible|Block Limit|inst_executed.sum|stalled_|rror" "$f" \
    | sed 's/  */ /g; s/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//' | head -30
done; done
timeout 200 python3 benchmarks/int_wgmma_bench.py "$OUT/wgmma-g128.json" --groups 128 --sweep \
  > "$OUT/wgmma-g128.log" 2>&1; grep -E " (kiln|wgmma|st4|bn64|split.2) |failed" "$OUT/wgmma-g128.log" | head -60; tail -6 "$OUT/wgmma-g128.log"
timeout 150 python3 -m pytest -q tests/test_int_wgmma.py -p no:cacheprovider --tb=short -m gpu \
  2>&1 | tail -4
