#!/usr/bin/env bash
# 54th session, call 3 (nvidia-h200; carry .whl): the TMA GEMV as groups of 32's default
# (the epilogues skipped where it takes the product): GPU tests, then batch 1 in groups of
# 32 with the defaults (a short call: 6 minutes of device time were left)
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_int4_gemv_tma.py \
  tests/test_gguf_kept.py --tb=short 2>&1 | tail -8
run() {  # run TAG SPEC [ENV...]
  env "${@:3}" RUN_TAG=-$1 EXTRA_ARGS="--load-format dummy --quantize-lm-head" \
    STAGE_TIMEOUT=120 bash benchmarks/gpu_suite.sh $2 2>&1 | grep -E "kiln |rror" \
    | sed "s/^/[$1] /" | tee -a "$OUT/b1.log"
}
run warm q4g32:latency-b1; run g32-1 q4g32:latency-b1
rm -f "$OUT"/*.png
