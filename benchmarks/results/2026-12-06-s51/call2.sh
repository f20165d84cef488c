#!/usr/bin/env bash
# 51st session, call 2 (last try, ~4 minutes of device time left): the TMA kernel, its
# A-in-registers variant. Nsight Compute on one gate_up call at 8 rows (groups of 128),
# per-linear timings at 1 / 8 / 64 rows, the GPU tests of one shape.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
M="smsp__inst_executed.sum,dram__bytes_read.sum"
for r in long_scoreboard short_scoreboard wait not_selected math_pipe_throttle barrier \
         mio_throttle lg_throttle no_instruction membar sleeping; do
  M="$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"; done
for ar in 0 1; do
  f="$OUT/ncu-8-$ar.txt"
  KILN_INT_WGMMA=1-64 KILN_INT_WGMMA_CFG=128,128,1,3,1,$ar timeout 60 ncu --clock-control none \
    --profile-from-start off --kernel-name-base function -k 'regex:^_w4' --section SpeedOfLight \
    --section Occupancy --section WarpStateStats --metrics "$M" \
    python3 benchmarks/ncu_linear.py int4 8 gate_up > "$f" 2>&1
  echo "--- ncu rows 8 a_regs $ar"; grep -E "Duration|DRAM Throughput|Achieved Occupancy|stalled_|rror" "$f" \
    | sed 's/  */ /g; s/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//' | head -20
done
timeout 100 python3 benchmarks/int_wgmma_bench.py "$OUT/wgmma-g128.json" --groups 128 --rows 1,8,64 \
  > "$OUT/wgmma-g128.log" 2>&1; grep -v "^$" "$OUT/wgmma-g128.log" | tail -45
timeout 60 python3 -m pytest -q tests/test_int_wgmma.py -p no:cacheprovider --tb=short -m gpu \
  -k "6144-4096-128" 2>&1 | tail -4
