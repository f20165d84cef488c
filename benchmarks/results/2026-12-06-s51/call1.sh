#!/usr/bin/env bash
# 51st session, call 1: the Gluon W4A16 wgmma kernel's first run on a GPU: its GPU tests,
# the per-linear timings (8B shapes, 1-64 rows, groups of 128 with a sweep, of 32), then
# int4 64 x 512 / 256 end to end with it off / on.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
timeout 240 python3 -m pytest -q -x tests/test_int_wgmma.py -p no:cacheprovider --tb=short \
  -k "gpu and 64 and 6144" 2>&1 | tail -15 | tee "$OUT/tests-quick.log"
timeout 200 python3 benchmarks/int_wgmma_bench.py "$OUT/wgmma-g128.json" --groups 128 --sweep \
  2>&1 | tee "$OUT/wgmma-g128.log" | grep -v "^$"
timeout 240 python3 -m pytest -q tests/test_int_wgmma.py -p no:cacheprovider --tb=short -m gpu \
  2>&1 | tail -15 | tee "$OUT/tests.log"
