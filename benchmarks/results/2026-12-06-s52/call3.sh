#!/usr/bin/env bash
# 52nd session, call 3 (75 s, on the machine still warm from call 2): bf16 twice more and
# the Gluon kernel at 33-64 rows once more, for the spread of call 2's ratio.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache
for t in bf16-2:0:throughput-64 wg1-3:33-64:int4:throughput-64 bf16-3:0:throughput-64; do
  IFS=: read tag v spec rest <<< "$t"; [ -n "$rest" ] && spec=$spec:$rest
  KILN_INT_WGMMA=$v RUN_TAG=-$tag EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=100 \
    bash benchmarks/gpu_suite.sh $spec 2>&1 | grep -E "kiln |rror" | sed "s/^/[$tag] /" \
    | tee -a $OUT/e2e.log
done
