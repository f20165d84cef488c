#!/usr/bin/env bash
# 51st session, call 3: int4 (g128, RTN) 64 x 512 / 256 end to end, the Gluon wgmma kernel
# at 5-64 rows off / on, alternating, against bf16 in the same call.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
for i in 1 2; do
  for v in 0 1; do
    KILN_INT_WGMMA=$v RUN_TAG=-wg$v-$i EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=200 \
      bash benchmarks/gpu_suite.sh int4:throughput-64 2>&1 | grep -E "kiln |tok/s|TPOT|rror" | sed "s/^/[wgmma=$v $i] /"
  done
done
RUN_TAG=-bf16 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=200 bash benchmarks/gpu_suite.sh throughput-64 \
  2>&1 | grep -E "kiln |tok/s|TPOT|rror" | sed "s/^/[bf16] /"
