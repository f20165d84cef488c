#!/usr/bin/env bash
# Session 21, call 2 (one H200): FP8 1000/1000 (512 requests) with decode attention's register
# cap 168 against none, alternating; then the FP8 128/128 run under the profiler.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
for i in 1 2; do
  for cap in "" 168; do
    KILN_KV8_DECODE_MAXNREG=$cap OUT=$R RUN_TAG=-cap${cap:-none}-$i NUM_REQUESTS=512 \
      EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=100 \
      bash benchmarks/gpu_suite.sh fp8:throughput-1k 2>&1 | grep -E "^kiln|decode|floor|took"
    pack
  done
done
OUT=$R EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=120 bash benchmarks/gpu_suite.sh fp8:proftput \
  > $R/proftput.out 2>&1; tail -60 $R/proftput.out; pack
