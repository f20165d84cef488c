#!/usr/bin/env bash
# Session 21, call 1 (one H200): the twentieth session's untested GPU tests, the register-cap
# sweep of 1-byte decode attention, and FP8 batch 1 with the LM head in bf16 / int8 / e4m3.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
  tests/test_bench_roofline.py tests/test_kernels_kvquant.py tests/test_gpu_engine.py \
  -k "gemm_rate or register_cap or fp8_engine_on_gpu" > $R/tests.log 2>&1
tail -3 $R/tests.log; pack
SWEEP_MAXNREG=0,168,128 SWEEP_CONFIGS="64,2,2;128,2,2;64,2,4" OUT=$R STAGE_TIMEOUT=200 \
  bash benchmarks/gpu_suite.sh attn-decode-sweep > $R/sweep.log 2>&1; tail -30 $R/sweep.log; pack
for head in none int8_wo auto; do
  extra="--load-format dummy"; [ $head != none ] && extra="$extra --quantize-lm-head $head"
  OUT=$R RUN_TAG=-head-$head-1 EXTRA_ARGS="$extra" STAGE_TIMEOUT=75 \
    bash benchmarks/gpu_suite.sh fp8:latency-b1 2>&1 | grep -E "^kiln|HBM|took"; pack
done
