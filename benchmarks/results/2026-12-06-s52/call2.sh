#!/usr/bin/env bash
# 52nd session, call 2 (~6 minutes): int4 (g128, RTN) 64 x 512 / 256 end to end, kiln's
# Triton tiles vs the Gluon wgmma kernel at 5-64 rows in the launch CFG (default: the
# warp-specialized one, K splits by the rule), alternating, bf16 in the same call.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
CFG=${CFG:-128,128,0,3,1,0,1}
nvidia-smi --query-gpu=name --format=csv,noheader
for i in 1 2; do
  for v in 0 1; do
    KILN_INT_WGMMA=$v KILN_INT_WGMMA_CFG=$CFG RUN_TAG=-wg$v-$i EXTRA_ARGS="--load-format dummy" \
      STAGE_TIMEOUT=200 bash benchmarks/gpu_suite.sh int4:throughput-64 2>&1 \
      | grep -E "kiln |tok/s|TPOT|rror" | sed "s/^/[wgmma=$v $i] /" | tee -a "$OUT/e2e.log"
  done
done
RUN_TAG=-bf16 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=200 \
  bash benchmarks/gpu_suite.sh throughput-64 2>&1 | grep -E "kiln |tok/s|TPOT|rror" \
  | sed "s/^/[bf16] /" | tee -a "$OUT/e2e.log"
