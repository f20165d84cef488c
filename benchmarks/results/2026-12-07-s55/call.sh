#!/usr/bin/env bash
# The 55th session's device call (`d`: ROUNDS=1, cut at 245 s after the mutant check's
# first half), and the next session's (nvidia-h200 preferred; carry .whl; first make
# ab_old/ = the tree before the 55th session's changes, untracked, so the copy carries it:
#   mkdir ab_old && git archive 370d94b kiln benchmarks | tar -x -C ab_old ):
#  a (~6 min): GPU tests: the TMA GEMV engine test (logprobs to rounding, its epilogues
#     now the default), the Gluon kernel's 128-row blocks, every row count through
#     int_weight_linear (test_gpu_int_linear: the new 65-255-row launches); the mutant
#     check (mutate_check.py)
#  p (~6 min): int_prefill_bench at 65 / 128 / 192 / 255 rows: the rule's launches against
#     the Gluon kernel's variants, 256-row blocks among them (for 129-255 rows, where qkv
#     and o still take the dequantized weight: if they win, block_m 256 past 128 rows and
#     all four linears there)
#  b (~8 min): 128 requests of 128 / 256, int4 and int8_wo, new vs old (ab_old), and bf16
#  c (~6 min): batch 1 (128 in / 256 out, --quantize-lm-head) int4 groups of 128 and 32,
#     new vs old alternating (#10's 450 target on an H200: the 128-token prompt's linears
#     are now the 128-row blocks; groups of 32 with the TMA GEMV's epilogues)
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
mkdir -p /tmp/site && pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:$PWD/benchmarks:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/0card.log"
run() {  # run DIR TAG SPEC [ENV...]
  (cd "$1" && env "${@:4}" RUN_TAG=-$2 EXTRA_ARGS="--load-format dummy $X" STAGE_TIMEOUT=150 \
    PYTHONPATH=$PWD:$PWD/benchmarks:/tmp/site bash benchmarks/gpu_suite.sh $3 2>&1 \
    | grep -E "kiln |rror" | sed "s/^/[$2] /" | tee -a "$OUT/$LOG")
}
case "${1:-a}" in
a) timeout 300 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_int4_gemv_tma.py \
     tests/test_int_wgmma.py "tests/test_kernels_int.py::test_gpu_int_linear" --tb=short 2>&1 \
     | grep -Ev "Writing|^$" | tail -25 > "$OUT/1tests.log"; tail -6 "$OUT/1tests.log"
   timeout 90 python3 benchmarks/results/2026-12-07-s55/mutate_check.py 2>&1 \
     | grep -E "^(real|rolled)|Error" | tee "$OUT/2mutate.log" ;;
p) timeout 400 python3 benchmarks/int_prefill_bench.py /tmp/prefill.json --rows 65,128,192,255 \
     > "$OUT/3prefill.log" 2>&1; grep -A80 "^a layer" "$OUT/3prefill.log" | grep -E "kiln|cublas|256" ;;
b) export NUM_REQUESTS=128 LOG=4e2e.log X=""
   for i in ${ROUNDS:-1 2}; do
     run . int4-new$i int4:throughput-few; run ab_old int4-old$i int4:throughput-few
     run . int8-new$i int8w:throughput-few; run ab_old int8-old$i int8w:throughput-few
   done
   run . bf16 throughput-few ;;
c) export LOG=5b1.log X="--quantize-lm-head"
   for i in 1 2; do
     run . g128-new$i int4:latency-b1; run ab_old g128-old$i int4:latency-b1
     run . g32-new$i q4g32:latency-b1; run ab_old g32-old$i q4g32:latency-b1
   done ;;
esac
rm -f "$OUT"/*.json "$OUT"/*.png
