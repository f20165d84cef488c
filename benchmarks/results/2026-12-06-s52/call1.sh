#!/usr/bin/env bash
# 52nd session, call 1 (~6 minutes): the Gluon wgmma kernel after the 51st session's fixes
# (groups of 128's scale columns, the A-in-registers variant), none run on a GPU yet: the
# GPU tests, Nsight Compute's stall reasons on gate_up at 8 and 64 rows (one warp group
# issuing the copies too vs the warp-specialized kernel), then the per-linear sweep (deeper rings: is a step bound by the bytes
# in flight?).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
P=benchmarks/results/2026-12-06-s52/probe.py
for a in "32 8 1 0 0" "128 8 1 0 0" "64 8 1 0 0" "128 64 4 0 0" "128 8 1 1 0" "128 8 1 0 1" \
         "32 64 1 0 1" "128 64 4 0 1"; do timeout 60 python3 $P $a 2>&1 | tail -1; done \
  | tee "$OUT/probe.log"
GB=128; grep -q "'128', '8', '1', '0', '0'\] ok" "$OUT/probe.log" || GB=32
grep -q "'32', '8', '1', '0', '0'\] ok" "$OUT/probe.log" || GB=none
[ $GB = none ] && { echo "the plain kernel fails at groups of 32 too: stopping"; exit 0; }
timeout 200 python3 -m pytest -q tests/test_int_wgmma.py -p no:cacheprovider --tb=short -m gpu \
  -x 2>&1 | tail -8
M="smsp__inst_executed.sum,dram__bytes_read.sum"
for r in long_scoreboard short_scoreboard wait not_selected math_pipe_throttle barrier \
         mio_throttle lg_throttle no_instruction membar sleeping; do
  M="$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"; done
for rows in 8 64; do for v in 0,0 0,1; do
  f="$OUT/ncu-$rows-${v/,/}.txt"
  KILN_INT_WGMMA=1-64 KILN_INT_WGMMA_CFG=128,128,1,3,1,$v timeout 60 ncu --clock-control none \
    --profile-from-start off --kernel-name-base function -k 'regex:^_w4' --section SpeedOfLight \
    --section Occupancy --section WarpStateStats --metrics "$M" \
    python3 benchmarks/ncu_linear.py int4 $rows gate_up > "$f" 2>&1
  echo "--- ncu rows $rows a_regs,ws $v"; grep -E "Duration|DRAM Throughput|Achieved Occupancy|Block Limit|stalled_|rror" "$f" \
    | sed 's/  */ /g; s/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//' | head -24
done; done
timeout 240 python3 benchmarks/int_wgmma_bench.py "$OUT/wgmma-g$GB.json" --groups $GB \
  --rows 8,64 --sweep > "$OUT/wgmma-g$GB.log" 2>&1; grep -v "^$" "$OUT/wgmma-g$GB.log" | tail -110
