#!/usr/bin/env bash
# 53rd session, call 4 (run inline on the warm H100): int4 32 x 128 / 256 with the Gluon
# kernel at 5-64 rows against 5-8,33-64 (one wave at 9-32 rows in both), bf16 once
OUT=${OUT:-gpu-out}; export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache
for t in all-1:1 two-1:5-8,33-64 all-2:1 two-2:5-8,33-64 bf16:; do
  tag=${t%%:*}; v=${t#*:}; spec=int4:throughput-few; [ $tag = bf16 ] && spec=throughput-few
  KILN_INT_WGMMA=$v NUM_REQUESTS=32 RUN_TAG=-$tag EXTRA_ARGS="--load-format dummy" \
    STAGE_TIMEOUT=120 bash benchmarks/gpu_suite.sh $spec 2>&1 | grep -E "kiln |rror" \
    | sed "s/^/[$tag] /" | tee -a $OUT/e2e32.log
done
