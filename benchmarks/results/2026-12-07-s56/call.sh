#!/usr/bin/env bash
# The 56th session's device calls, none of which ran (no machine could be started all
# session): for the 57th (nvidia-h200 preferred; run a2 before making either PDL launch the
# default; carry .whl; ab_old/ = the tree
# before the 55th session's changes, untracked so the copy carries it:
#   mkdir ab_old && git archive 370d94b kiln benchmarks | tar -x -C ab_old ):
#  a2 (~5 min): the GPU tests of the two PDL launches (both kernels' references, the TMA
#     GEMV's engine test with PDL) and test_gpu_int_linear; a: the same and more
#  a (~6.5 min): GPU tests (the TMA GEMV engine test by logprobs, the Gluon 128-row blocks,
#     test_gpu_int_linear over every row count: the 65-255-row launches) + the mutant check
#  f (~2 min): where an int4 g128 batch-1 step goes (kiln bench latency --profile,
#     trace_gaps --by-kernel): what is left beside the GEMVs
#  t (~6 min): batch 1 (128 / 256, --quantize-lm-head): the TMA GEMV launched with PDL
#     (KILN_INT4_GEMV_TMA_PDL=1) against the default, groups of 128 (pairs GEMV) and 32
#  w (~8 min): the Gluon decode-batch kernel launched with PDL (KILN_INT_WGMMA_PDL=1)
#     against not, int4 64 x 512 / 256 and 16 requests of 128 / 256; bf16 64 x 512 / 256
#  (one 10-minute call fits `ROUNDS=1 ... a2 t`; then `t` again and `w` in the next)
#  n (~4 min at ROUNDS=1, 57th): the GPU tests of the int4 GEMV's add + RMSNorm epilogue,
#     then batch 1 g128 with KILN_INT_ADD_NORM=1 against without (N32=1: and groups of 32,
#     the TMA GEMV's epilogue)
#  u (~2 min): t's groups of 128 only, once
#  c (~6 min): batch 1 (128 / 256, --quantize-lm-head) int4 g128 and q4g32, new vs old
#  p (~6 min): int_prefill_bench at 65 / 128 / 192 / 255 rows (256-row Gluon blocks)
#  b (~8 min): 128 requests of 128 / 256, int4 and int8_wo new vs old, and bf16
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
for stage in ${*:-a}; do case $stage in
a2) timeout ${A2:-300} python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_int4_gemv_tma.py \
     "tests/test_kernels_int.py::test_gpu_int_linear" \
     "tests/test_int_wgmma.py::test_gpu_matches_the_reference" --tb=short 2>&1 \
     | grep -Ev "Writing|^$" | tail -25 > "$OUT/1tests.log"; tail -6 "$OUT/1tests.log" ;;
a) timeout 360 python3 -m pytest -q -s -p no:cacheprovider -m gpu "tests/test_kernels_int.py::test_gpu_int_linear" \
     tests/test_int4_gemv_tma.py tests/test_int_wgmma.py --tb=short 2>&1 \
     | grep -Ev "Writing|^$" | tail -25 > "$OUT/1tests.log"; tail -6 "$OUT/1tests.log"
   timeout 150 python3 benchmarks/results/2026-12-07-s55/mutate_check.py 2>&1 \
     | grep -E "^(real|rolled)|Error" | tee "$OUT/2mutate.log" ;;
f) for pdl in 1 0; do  # 0: PDL off everywhere, so each kernel's span is its own time
     env KILN_PDL=$pdl KILN_INT_PDL=$pdl KILN_ATTN_PDL=$pdl timeout 200 python3 -m kiln.cli \
       bench latency --random-config llama-3.1-8b --input-len 128 --output-len 256 \
       --max-seq-len 2048 --quantization int4_wo --group-size 128 --load-format dummy \
       --quantize-lm-head --profile /tmp/prof-b1-$pdl 2>&1 | tail -4 > "$OUT/1prof$pdl.log"
     timeout 120 python3 benchmarks/trace_gaps.py /tmp/prof-b1-$pdl/trace.json --by-kernel \
       --top 40 >> "$OUT/1prof$pdl.log" 2>&1; grep -A45 "^kernel" "$OUT/1prof$pdl.log" | cut -c1-110
   done ;;
p) timeout 400 python3 benchmarks/int_prefill_bench.py /tmp/prefill.json --rows 65,128,192,255 \
     > "$OUT/3prefill.log" 2>&1; grep -A80 "^a layer" "$OUT/3prefill.log" | grep -E "kiln|cublas|256" ;;
b) export NUM_REQUESTS=128 LOG=4e2e.log X=""
   for i in ${ROUNDS:-1 2}; do
     run . int4-new$i int4:throughput-few; run ab_old int4-old$i int4:throughput-few
     run . int8-new$i int8w:throughput-few; run ab_old int8-old$i int8w:throughput-few
   done
   run . bf16 throughput-few ;;
t) export LOG=6pdl.log X="--quantize-lm-head"  # the TMA GEMV launched with PDL (new)
   for i in ${ROUNDS:-1 2}; do
     run . g128-pairs$i int4:latency-b1
     run . g128-tmapdl$i int4:latency-b1 KILN_INT4_GEMV_TMA=1 KILN_INT4_GEMV_TMA_PDL=1
     run . g32-tma$i q4g32:latency-b1
     run . g32-tmapdl$i q4g32:latency-b1 KILN_INT4_GEMV_TMA_PDL=1
   done ;;
w) export LOG=7wgmma-pdl.log X=""  # the Gluon decode-batch kernel launched with PDL (new)
   for i in ${ROUNDS:-1 2}; do
     run . int4-64$i int4:throughput-64; run . int4-64pdl$i int4:throughput-64 KILN_INT_WGMMA_PDL=1
     run . int4-16$i int4:throughput-few NUM_REQUESTS=16
     run . int4-16pdl$i int4:throughput-few NUM_REQUESTS=16 KILN_INT_WGMMA_PDL=1
     run . bf16-64$i throughput-64  # #10's 64 x 512 / 256 bar, on this card
   done ;;
n) timeout 240 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_int4_add_norm.py \
     --tb=short 2>&1 | grep -Ev "Writing|^$" | tail -15 > "$OUT/8addnorm-tests.log"
   tail -4 "$OUT/8addnorm-tests.log"  # the o / down GEMVs' add + RMSNorm epilogue (57th)
   export LOG=8addnorm.log X="--quantize-lm-head"
   for i in ${ROUNDS:-1 2}; do
     run . g128-addnorm$i int4:latency-b1 KILN_INT_ADD_NORM=1; run . g128-pairs$i int4:latency-b1
     [ -n "${N32:-}" ] && { run . g32-addnorm$i q4g32:latency-b1 KILN_INT_ADD_NORM=1
                           run . g32-tma$i q4g32:latency-b1; }
   done ;;
u) export LOG=6pdl.log X="--quantize-lm-head"  # t's groups of 128 only, once
   run . g128-tmapdl int4:latency-b1 KILN_INT4_GEMV_TMA=1 KILN_INT4_GEMV_TMA_PDL=1
   run . g128-pairs int4:latency-b1 ;;
c) export LOG=5b1.log X="--quantize-lm-head"
   for i in 1 2; do
     run . g128-new$i int4:latency-b1; run ab_old g128-old$i int4:latency-b1
     run . g32-new$i q4g32:latency-b1; run ab_old g32-old$i q4g32:latency-b1
   done ;;
x) export LOG=9x.log X="--quantize-lm-head"  # 58th: repeats of t / n, PDL with the epilogue
   for i in 1 2; do
     run . g32-tma$i q4g32:latency-b1; run . g32-tmapdl$i q4g32:latency-b1 KILN_INT4_GEMV_TMA_PDL=1
     run . g32-both$i q4g32:latency-b1 KILN_INT4_GEMV_TMA_PDL=1 KILN_INT_ADD_NORM=1
   done
   run . g128-pairs int4:latency-b1; run . g128-addnorm int4:latency-b1 KILN_INT_ADD_NORM=1
   export X=""; run . int4-64pdl int4:throughput-64 KILN_INT_WGMMA_PDL=1
   run . int4-64 int4:throughput-64 ;;
v) timeout 200 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_int_wgmma.py \
     tests/test_int4_gemv_tma.py --tb=short 2>&1 | grep -Ev "Writing|^$" | tail -15 > "$OUT/10tests.log"
   tail -4 "$OUT/10tests.log"  # 58th: the TMA GEMV's PDL launch and 65-128 rows' one wave
   export LOG=10v.log X="--quantize-lm-head"
   run . g32-default q4g32:latency-b1; run . g128-default int4:latency-b1
   timeout 200 python3 benchmarks/int_prefill_bench.py /tmp/prefill.json --rows 65,100,128 \
     --kinds 4:128,4:32 > "$OUT/10prefill.log" 2>&1
   grep -A40 "^a layer" "$OUT/10prefill.log" | grep -E "kiln|cublas|split" ;;
esac; done
rm -f "$OUT"/*.json "$OUT"/*.png
