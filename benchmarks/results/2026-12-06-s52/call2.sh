#!/usr/bin/env bash
# 52nd session, call 2 (~6 minutes): the wgmma kernel's GPU tests after call 1's changes
# (64 rows a program past 32 rows; the A-in-registers and warp-specialized variants
# removed), then int4 (g128, RTN) 64 x 512 / 256 end to end, the Triton tiles vs the
# Gluon kernel at 33-64 rows (gate_up and down only: int_launch.wgmma_takes),
# alternating, bf16 in the same call.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q tests/test_int_wgmma.py -p no:cacheprovider --tb=short -m gpu \
  -x 2>&1 | tail -4 | tee "$OUT/gpu-tests.log"
run() {  # run TAG WGMMA SPEC
  KILN_INT_WGMMA=$2 RUN_TAG=-$1 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=150 \
    bash benchmarks/gpu_suite.sh $3 2>&1 | grep -E "kiln |tok/s|TPOT|rror" \
    | sed "s/^/[$1] /" | tee -a "$OUT/e2e.log"
}
run wg0-1 0 int4:throughput-64; run wg1-1 33-64 int4:throughput-64
run bf16 0 throughput-64
run wg0-2 0 int4:throughput-64; run wg1-2 33-64 int4:throughput-64
