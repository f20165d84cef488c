#!/usr/bin/env bash
# Call 4: FP8 + FP8 KV 1000 / 1000 x 1000 requests on today's defaults (the target row's
# latest number), and FP8 batch 1 with everything opt-in that helped (int8 LM head, PDL).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
KILN_PDL=1 OUT=$R RUN_TAG=-pdl1-head8 EXTRA_ARGS="--load-format dummy --quantize-lm-head int8_wo" \
  STAGE_TIMEOUT=80 bash benchmarks/gpu_suite.sh fp8:latency-b1 2>&1 | grep -A1 "^engine" | tail -1
pack
OUT=$R NUM_REQUESTS=1000 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=200 \
  bash benchmarks/gpu_suite.sh fp8:throughput-1k 2>&1 | grep -E "^kiln|steps|floor"
pack
