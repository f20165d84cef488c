#!/usr/bin/env bash
# 51st session: the smallest check that fits the last device minutes: groups of 128 after
# the scale-tile fix, the TMA kernel and its A-in-registers variant at 8 and 64 rows.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 benchmarks/int_wgmma_bench.py "$OUT/wgmma-g128.json" --groups 128 --rows 8,64 \
  > "$OUT/wgmma-g128.log" 2>&1; grep -v "^$" "$OUT/wgmma-g128.log" | tail -40
