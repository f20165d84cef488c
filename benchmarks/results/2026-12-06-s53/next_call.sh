#!/usr/bin/env bash
# For the next device session (`run` with kind nvidia-h200 if one starts, else
# nvidia-h100-x1; carry .whl for the gguf tests), in two calls:
#   a (~5 min): the int8 wgmma kernel (opt-in, never run on a GPU) tested, then timed per
#      linear against the Triton tiles at 8-64 rows with the launches around its default
#   b (~9 min): int8_wo 64 x 512 / 256 with it (KILN_INT8_WGMMA=1) and without, bf16 in
#      the same call (#10: int8 at 0.95x bf16 on an H200), then int4 64 x 512 / 256 on
#      the H200 (the 32nd's 0.83x row; 1.015x on an H100 in the 52nd)
#   c (~7 min): the TMA-fed one-row int4 GEMV (opt-in, never run on a GPU) tested, timed
#      per linear against the pairs GEMV, then int4 batch 1 (#10's 450 tok/s on an H200)
#      with it on o and down only (gate_up and qkv keep their GLU / rotary epilogues) and
#      on every linear (the epilogues off), against the default, alternating
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${1:-a}" = c ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_int4_gemv_tma.py \
    --tb=short 2>&1 | tail -6
  timeout 200 python3 benchmarks/int_wgmma_bench.py "$OUT/gemv-tma.json" --gemv-tma --sweep \
    > "$OUT/gemv-tma.log" 2>&1; tail -4 "$OUT/gemv-tma.log"
  b1() {  # b1 TAG ENV...
    env "${@:2}" RUN_TAG=-$1 EXTRA_ARGS="--load-format dummy --quantize-lm-head" \
      STAGE_TIMEOUT=120 bash benchmarks/gpu_suite.sh int4:latency-b1 2>&1 \
      | grep -E "kiln |rror" | sed "s/^/[$1] /" | tee -a "$OUT/b1.log"
  }
  b1 warm KILN_INT4_GEMV_TMA=1
  for i in 1 2; do
    b1 def-$i KILN_INT4_GEMV_TMA=0; b1 tma-$i KILN_INT4_GEMV_TMA=1
    b1 all-$i KILN_INT4_GEMV_TMA=1 KILN_INT_GLU=0 KILN_INT_ROPE=0
  done
  rm -f "$OUT"/*.png; exit 0
fi
if [ "${1:-a}" = a ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_int8_wgmma.py \
    --tb=short 2>&1 | tail -6
  timeout 240 python3 benchmarks/int_wgmma_bench.py "$OUT/w8-rows.json" --bits 8 \
    --rows 8,16,32,64 --sweep > "$OUT/w8-rows.log" 2>&1; grep -A6 "^a layer" "$OUT/w8-rows.log"
  exit 0
fi
run() {  # run TAG KILN_INT8_WGMMA SPEC
  KILN_INT8_WGMMA=$2 RUN_TAG=-$1 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=150 \
    bash benchmarks/gpu_suite.sh $3 2>&1 | grep -E "kiln |rror" | sed "s/^/[$1] /" \
    | tee -a "$OUT/e2e.log"
}
run warm 1 int8w:throughput-64; run warm4 0 int4:throughput-64  # (compiles: not counted)
for i in 1 2; do
  run w8-$i 1 int8w:throughput-64; run tiles-$i 0 int8w:throughput-64
  run bf16-$i 0 throughput-64; run int4-$i 0 int4:throughput-64
done
rm -f "$OUT"/*.png
