#!/usr/bin/env bash
# For the next device session (~5 minutes; then call3.sh, ~6 minutes): the Gluon wgmma
# kernel after the 51st session's fixes, none of them run on a GPU yet (groups of 128's
# scale columns, the A-in-registers variant). The GPU tests first (80; the illegal
# instruction of the 51st's call 2 poisoned every test after it), then Nsight Compute's
# stall reasons on one gate_up call at 8 and 64 rows (does the MEMBAR of the fence before
# each TMA issue wait for the copies in flight?), then the per-linear timings and sweep.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q tests/test_int_wgmma.py -p no:cacheprovider --tb=short -m gpu \
  2>&1 | tail -6
M="smsp__inst_executed.sum,dram__bytes_read.sum"
for r in long_scoreboard short_scoreboard wait not_selected math_pipe_throttle barrier \
         mio_throttle lg_throttle no_instruction membar sleeping; do
  M="$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"; done
for rows in 8 64; do for ar in 0 1; do
  f="$OUT/ncu-$rows-$ar.txt"
  KILN_INT_WGMMA=1-64 KILN_INT_WGMMA_CFG=128,128,1,3,1,$ar timeout 60 ncu --clock-control none \
    --profile-from-start off --kernel-name-base function -k 'regex:^_w4' --section SpeedOfLight \
    --section Occupancy --section WarpStateStats --metrics "$M" \
    python3 benchmarks/ncu_linear.py int4 $rows gate_up > "$f" 2>&1
  echo "--- ncu rows $rows a_regs $ar"; grep -E "Duration|DRAM Throughput|Achieved Occupancy|stalled_|rror" "$f" \
    | sed 's/  */ /g; s/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//' | head -20
done; done
timeout 200 python3 benchmarks/int_wgmma_bench.py "$OUT/wgmma-g128.json" --groups 128 --sweep \
  > "$OUT/wgmma-g128.log" 2>&1; grep -v "^$" "$OUT/wgmma-g128.log" | tail -12
timeout 100 python3 benchmarks/int_wgmma_bench.py "$OUT/wgmma-g32.json" --groups 32 --rows 8,64 \
  2>&1 | tail -3
