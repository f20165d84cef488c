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
for i in 1 2; do
  for v in 0 33-64; do
    KILN_INT_WGMMA=$v RUN_TAG=-wg$v-$i EXTRA_ARGS="--load-format dummy" \
      STAGE_TIMEOUT=150 bash benchmarks/gpu_suite.sh int4:throughput-64 2>&1 \
      | grep -E "kiln |tok/s|TPOT|rror" | sed "s/^/[wgmma=$v $i] /" | tee -a "$OUT/e2e.log"
  done
done
RUN_TAG=-bf16 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=150 \
  bash benchmarks/gpu_suite.sh throughput-64 2>&1 | grep -E "kiln |tok/s|TPOT|rror" \
  | sed "s/^/[bf16] /" | tee -a "$OUT/e2e.log"
