#!/usr/bin/env bash
# 25th session, call 4: the GPU tests the 24th-session suite's group a did not reach (its
# stage timed out at 83%), the new TMA engine test, the decode tests on the transposed
# layout's new launch (128-key tiles); then FP8 + FP8 KV end to end with that launch.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
P="python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short --durations=12"
timeout 230 $P tests/test_gpu_engine.py tests/test_bench_roofline.py \
  -k "sinks or mixed_steps or tma_prefill or v_transposed or fp8_engine_on_gpu or gemm_rate" \
  > $R/tests-engine.log 2>&1 &
timeout 230 $P tests/test_kernels_kvquant.py -k "decode or transposed" > $R/tests-kv.log 2>&1 &
wait
tail -n 22 $R/tests-engine.log; tail -n 6 $R/tests-kv.log; pack
run() {  # run TAG STAGE [NUM_REQUESTS]
  NUM_REQUESTS=${3:-1000} OUT=$R RUN_TAG=$1 EXTRA_ARGS="--load-format dummy" \
    STAGE_TIMEOUT=150 bash benchmarks/gpu_suite.sh $2 2>&1 \
    | grep -E "^kiln|decode steps|prompt steps|Triton compiled|error"
  pack
}
run -vt128 fp8:throughput
run -vt128 fp8:throughput-1k 512
