#!/usr/bin/env bash
# The 59th session's device call 2 (carry .whl: `pip download --no-deps -d .whl gguf`):
# batch 1 int4 in groups of 128 (128 / 256, --quantize-lm-head) with the TMA GEMV at some
# linears only (KILN_INT4_GEMV_TMA=1 + KILN_INT4_GEMV_TMA_SHAPES), alternating with the
# default (the pairs GEMV everywhere); then the rest of test_int_wgmma's GPU tests.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
mkdir -p /tmp/site && pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:$PWD/benchmarks:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/0card.log"
run() {  # run TAG [ENV...]
  env "${@:2}" RUN_TAG=-$1 EXTRA_ARGS="--load-format dummy --quantize-lm-head" \
    STAGE_TIMEOUT=120 bash benchmarks/gpu_suite.sh int4:latency-b1 2>&1 \
    | grep -E "kiln |rror" | sed "s/^/[$1] /" | tee -a "$OUT/1shapes.log"
}
T=KILN_INT4_GEMV_TMA=1
for i in 1 2; do
  run base$i
  run o$i $T KILN_INT4_GEMV_TMA_SHAPES=4096x4096
  run o-down$i $T KILN_INT4_GEMV_TMA_SHAPES=4096x4096,4096x14336
  run gate_up$i $T KILN_INT4_GEMV_TMA_SHAPES=28672x4096
  run qkv$i $T KILN_INT4_GEMV_TMA_SHAPES=6144x4096
  run head$i $T KILN_INT4_GEMV_TMA_SHAPES=128256x4096
done
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_int_wgmma.py -x \
  --tb=short 2>&1 | tail -4 | tee "$OUT/2wgmma-tests.log"
