#!/usr/bin/env bash
# 54th session, call 4 (the last ~4 minutes of device time): GPU tests of the TMA GEMV's
# new default (an engine in groups of 32: its greedy tokens against the pairs GEMV's) and
# of the Gluon kernel's 128-row blocks, then those blocks timed at 128 rows
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 110 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_int4_gemv_tma.py \
  tests/test_int_wgmma.py -k "not test_gpu_matches_the_reference or 128-100" --tb=short 2>&1 | tail -8
timeout 80 python3 benchmarks/int_prefill_bench.py "$OUT/prefill128.json" --rows 128 \
  --kinds 4:128 > "$OUT/prefill128.log" 2>&1; grep -A12 "^a layer" "$OUT/prefill128.log" \
  || tail -5 "$OUT/prefill128.log"
