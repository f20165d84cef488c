#!/usr/bin/env bash
# 54th session (nvidia-h200; carry .whl). a: GPU tests of the changed dispatch, then int4
# batch 1 (TTFT: the 128-token prompt at 128 rows) and 128 requests of 128 / 256 (decode at
# 65-128 rows), the new default against the old (5-64 rows Gluon, 65-255 Triton tiles)
# and bf16 (in b). b: GGUF-layout int4 (groups of 32) batch 1, the TMA GEMV on o / down, on
# gate_up too (GLU epilogue off), on every linear, against the default pairs GEMV
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
run() {  # run LOG TAG SPEC [ENV...]
  env "${@:4}" RUN_TAG=-$2 EXTRA_ARGS="--load-format dummy --quantize-lm-head" \
    STAGE_TIMEOUT=150 bash benchmarks/gpu_suite.sh $3 2>&1 | grep -E "kiln |rror" \
    | sed "s/^/[$2] /" | tee -a "$OUT/$1.log"
}
if [ "${1:-a}" = a ]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_int_wgmma.py \
    tests/test_int4_gemv_tma.py "tests/test_kernels_int.py::test_gpu_int_linear" --tb=short \
    2>&1 | tail -6
  old="KILN_INT_WGMMA=5-64 KILN_INT_DEQUANT_FIRST=0"
  run b1 warm int4:latency-b1
  for i in 1 2; do run b1 new-$i int4:latency-b1; run b1 old-$i int4:latency-b1 $old; done
  export NUM_REQUESTS=128
  run t128 new int4:throughput-few; run t128 old int4:throughput-few $old
else
  NUM_REQUESTS=128 RUN_TAG=-bf16 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=150 \
    bash benchmarks/gpu_suite.sh throughput-few 2>&1 | grep -E "kiln |rror" \
    | sed "s/^/[bf16] /" | tee -a "$OUT/t128.log"  # (call a's bf16 run had the int4 flags)
  run g32 warm q4g32:latency-b1
  for i in 1 2; do
    run g32 def-$i q4g32:latency-b1; run g32 tma-$i q4g32:latency-b1 KILN_INT4_GEMV_TMA=1
    run g32 glu0-$i q4g32:latency-b1 KILN_INT4_GEMV_TMA=1 KILN_INT_GLU=0
    run g32 all-$i q4g32:latency-b1 KILN_INT4_GEMV_TMA=1 KILN_INT_GLU=0 KILN_INT_ROPE=0
  done
fi
rm -f "$OUT"/*.png
