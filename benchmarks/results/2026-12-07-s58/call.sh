#!/usr/bin/env bash
# The 58th session's next device calls (carry .whl: `pip download --no-deps -d .whl gguf`):
#  m (~5 min): the tensor-core int4 GEMV (kiln.kernels.int4_gemv_mma, opt-in
#     KILN_INT4_GEMV_MMA=1, untimed): its GPU tests, then per linear against the pairs GEMV
#     and the TMA GEMV in groups of 128 (int_wgmma_bench --gemv-tma --sweep), then batch 1
#     (128 / 256, --quantize-lm-head) g128 with it against without, twice
#  f (~1 min): the b1 int4 g128 profile (PDL on; trace_gaps --by-kernel), MMA=1 and not
#  h (~4 min, on an H200): the H200 numbers of BENCHMARKS.md's #10 rows with this tree's
#     defaults: b1 int4 g128 and g32, int4 and bf16 64 x 512 / 256
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
mkdir -p /tmp/site && pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:$PWD/benchmarks:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/0card.log"
run() {  # run TAG SPEC [ENV...]
  env "${@:3}" RUN_TAG=-$1 EXTRA_ARGS="--load-format dummy $X" STAGE_TIMEOUT=150 \
    bash benchmarks/gpu_suite.sh $2 2>&1 | grep -E "kiln |rror" | sed "s/^/[$1] /" \
    | tee -a "$OUT/$LOG"
}
for stage in ${*:-m}; do case $stage in
m) timeout 150 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_int4_gemv_mma.py \
     --tb=short 2>&1 | grep -Ev "Writing|^$" | tail -15 > "$OUT/1mma-tests.log"
   tail -4 "$OUT/1mma-tests.log"
   timeout 200 python3 benchmarks/int_wgmma_bench.py /tmp/mma.json --gemv-tma --groups 128 \
     --sweep > "$OUT/2mma-bench.log" 2>&1; grep -E "kiln|tma |mma|layer|G 128" "$OUT/2mma-bench.log"
   export LOG=3mma-b1.log X="--quantize-lm-head"
   for i in 1 2; do run g128-mma$i int4:latency-b1 KILN_INT4_GEMV_MMA=1; run g128$i int4:latency-b1; done ;;
f) for mma in 1 0; do
     env KILN_INT4_GEMV_MMA=$mma timeout 200 python3 -m kiln.cli bench latency --random-config \
       llama-3.1-8b --input-len 128 --output-len 256 --max-seq-len 2048 --quantization int4_wo \
       --group-size 128 --load-format dummy --quantize-lm-head --profile /tmp/prof-$mma 2>&1 \
       | tail -3 > "$OUT/4prof$mma.log"
     timeout 120 python3 benchmarks/trace_gaps.py /tmp/prof-$mma/trace.json --by-kernel --top 20 \
       >> "$OUT/4prof$mma.log" 2>&1; grep -A12 "^kernel" "$OUT/4prof$mma.log" | cut -c1-110
   done ;;
h) export LOG=5h200.log X="--quantize-lm-head"
   run g128 int4:latency-b1; run g32 q4g32:latency-b1
   X=""; run int4-64 int4:throughput-64; run bf16-64 throughput-64 ;;
esac; done
rm -f "$OUT"/*.json "$OUT"/*.png
