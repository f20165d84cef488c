#!/usr/bin/env bash
# For the next device session (`run` with kind nvidia-h200; carry .whl for the gguf tests):
#   a (~5 min): GPU tests of what the 54th session wrote after its device time ran out (the
#      TMA GEMV's slice layout and GLU epilogue, an engine in groups of 32 through it, the
#      Gluon kernel's 128-row blocks), then the TMA GEMV per linear at groups of 128 / 32
#      (--sweep: 32 / 64 / 128 rows a program) against the pairs GEMV
#   b (~9 min): batch 1 (128 in / 256 out, --quantize-lm-head) alternating: groups of 32,
#      default (TMA, unfused SiLU*mul and rotary) vs its GLU and rotary epilogues
#      (KILN_INT4_GEMV_TMA_GLU=1 KILN_INT4_GEMV_TMA_ROPE=1); groups of 128, default (pairs
#      GEMV + epilogues) vs the TMA GEMV on every linear with both epilogues; #10's
#      target is 450 tok/s at groups of 128 (425.0 / 425.9 now)
#   c (~7 min): linears at 65-200 rows (int_prefill_bench.py: the Gluon 128-row blocks,
#      the magic / digit-plane tiles), then 128 requests of 128 / 256 int4 vs bf16
#      (0.65x in the 54th), then #10's 64 x 512 / 256 int4 vs bf16 on the H200 (0.83x in
#      the 32nd, before the Gluon kernel; 1.015x on an H100 in the 52nd)
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
run() {  # run LOG TAG SPEC [ENV...]
  env "${@:4}" RUN_TAG=-$2 EXTRA_ARGS="--load-format dummy --quantize-lm-head" \
    STAGE_TIMEOUT=150 bash benchmarks/gpu_suite.sh $3 2>&1 | grep -E "kiln |rror" \
    | sed "s/^/[$2] /" | tee -a "$OUT/$1.log"
}
case "${1:-a}" in
a) timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_int4_gemv_tma.py \
     tests/test_int_wgmma.py -k "not test_gpu_matches_the_reference or 128-100" \
     --tb=short 2>&1 | tail -8
   timeout 220 python3 benchmarks/int_wgmma_bench.py "$OUT/gemv-tma.json" --gemv-tma --sweep \
     > "$OUT/gemv-tma.log" 2>&1; tail -4 "$OUT/gemv-tma.log" ;;
b) ep="KILN_INT4_GEMV_TMA_GLU=1 KILN_INT4_GEMV_TMA_ROPE=1"
   run b1 warm q4g32:latency-b1 $ep; run b1 warm int4:latency-b1 KILN_INT4_GEMV_TMA=1 $ep
   for i in 1 2; do
     run b1 g32-$i q4g32:latency-b1; run b1 g32ep-$i q4g32:latency-b1 $ep
     run b1 g128-$i int4:latency-b1
     run b1 g128tma-$i int4:latency-b1 KILN_INT4_GEMV_TMA=1 $ep
   done ;;
c) timeout 300 python3 benchmarks/int_prefill_bench.py "$OUT/prefill.json" --rows 65,128,200 \
     > "$OUT/prefill.log" 2>&1; grep -A60 "^a layer" "$OUT/prefill.log"
   export NUM_REQUESTS=128
   run t128 int4 int4:throughput-few
   NUM_REQUESTS=128 RUN_TAG=-bf16 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=150 \
     bash benchmarks/gpu_suite.sh throughput-few 2>&1 | grep -E "kiln |rror" \
     | sed "s/^/[bf16] /" | tee -a "$OUT/t128.log"
   for i in 1 2; do  # (int4's and bf16's engines built above)
     run t64 int4-$i int4:throughput-64
     RUN_TAG=-bf16-$i EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=150 \
       bash benchmarks/gpu_suite.sh throughput-64 2>&1 | grep -E "kiln |rror" \
       | sed "s/^/[bf16-$i] /" | tee -a "$OUT/t64.log"
   done ;;
esac
rm -f "$OUT"/*.png
