#!/usr/bin/env bash
# 53rd session, call 2: the Gluon int4 kernel at 5-8 rows end to end (8 requests of 128 in /
# 256 out: decode at 8 rows), the default (33-64) against 5-8,33-64, alternating, bf16 too.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
run() {  # run TAG KILN_INT_WGMMA SPEC
  KILN_INT_WGMMA=$2 NUM_REQUESTS=8 RUN_TAG=-$1 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=150 \
    bash benchmarks/gpu_suite.sh $3 2>&1 | grep -E "kiln |rror" | sed "s/^/[$1] /" \
    | tee -a "$OUT/e2e.log"
}
run warm 5-8,33-64 int4:throughput-few  # (compiles: not counted)
for i in 1 2 3; do
  run w58-$i 5-8,33-64 int4:throughput-few; run def-$i "" int4:throughput-few
  [ $i -lt 3 ] && run bf16-$i "" throughput-few
done
