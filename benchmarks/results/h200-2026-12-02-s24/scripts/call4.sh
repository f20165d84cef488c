#!/usr/bin/env bash
# Session 24, call 4 (results in call4/): V transposed now the default for 1-byte caches, the prefill kernel no
# longer specialised on the alignment of its unused ALiBi / rotary pointers. GPU tests, then
# FP8 128 / 128 (1000 requests) default against KILN_KV_V_TRANSPOSED=0, alternating.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
  tests/test_gpu_engine.py tests/test_kernels_gpu.py tests/test_kernels_kvquant.py \
  -k "v_transposed or fp8 or e4m3 or compile or mixed or prefill or int8" > $R/tests.log 2>&1
tail -4 $R/tests.log; pack
run() {  # run TAG V_T
  KILN_KV_V_TRANSPOSED=$2 OUT=$R RUN_TAG=$1 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=100 \
    bash benchmarks/gpu_suite.sh fp8:throughput 2>&1 \
    | grep -E "^kiln|decode steps|prompt steps|Triton compiled|error"
  pack
}
run -t1-1 1; run -t0-1 0; run -t1-2 1; run -t0-2 0
