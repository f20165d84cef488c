#!/usr/bin/env bash
# Session 21, call 4 (one H200): decode attention at 128 / 128's short contexts (PREFETCH bits,
# launches), the small kernels of a 500-row step, and the bf16 128 / 128 run under the profiler.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
SWEEP_SHAPES="496x192;496x128;496x256;512x1536" SWEEP_LAYOUTS=nhd SWEEP_PREFETCH=0,1,2,3 \
  SWEEP_CONFIGS="64,2,2;64,3,2;64,2,4;64,3,4;32,3,2;128,2,2" \
  timeout 240 python3 benchmarks/attn_decode_sweep.py $R/attn_short.json > $R/attn_short.log 2>&1
grep "^B=" $R/attn_short.log; pack
timeout 150 python3 benchmarks/small_kernels_bench.py $R/small_kernels.json --ms 496,1024 \
  > $R/small_kernels.log 2>&1; cat $R/small_kernels.log | grep -v Warn; pack
OUT=$R EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=120 bash benchmarks/gpu_suite.sh proftput \
  > $R/proftput-bf16.out 2>&1; grep -A32 "ops by self" $R/proftput.log 2>/dev/null | head -0
grep -E "_kernel|nvjet|elementwise|argmax|^kiln |steps|floor" $R/proftput.log | head -30; pack
