#!/usr/bin/env bash
# The 62nd session's device calls (carry .whl: `pip download --no-deps -d .whl gguf`). No
# device was lent in the 62nd session: none has run.
# (ran in the 63rd session: results in benchmarks/results/2026-12-07-s63; the scripts
# for stages a, e and s were removed after, with the experiments they timed)
#  a (~4 min): decode attention with e4m3 products (kiln.kernels.attention_decode_fp8mma,
#     opt-in): its GPU test, the CPU check on the GPU, then kernel timings against kiln's
#     converting kernel (benchmarks/attn_decode_fp8mma.py bench) at 5 shapes
#  e (~6 min): FP8 + FP8 KV end to end, KILN_DECODE_FP8_MMA 0 / 1 alternating:
#     128 / 128 x 1000, then 1000 / 1000 x 300 (take it only if `a` shows the kernel faster;
#     KILN_DECODE_FP8_MMA_LAUNCH from `a`'s best launch)
#  s (~3 min): int4 one-row GEMVs with float16 scales and offsets against float32
#     (benchmarks/int4_scale_dtype.py), kiln's dispatch, then every shape on the pairs GEMV
#  p / f / h: the 60th session's call.sh stages (int4 TMA GEMV PDL modes, profiles, H200)
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/0card.log"
for stage in "$@"; do case $stage in
a) timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_fp8mma.py \
     2>&1 | tail -3 | tee "$OUT/a0test.log"
   timeout 150 python3 benchmarks/attn_decode_fp8mma.py check > "$OUT/a1check.log" 2>&1
   tail -2 "$OUT/a1check.log"
   timeout 300 python3 benchmarks/attn_decode_fp8mma.py bench "$OUT/a2bench.json" \
     > "$OUT/a2bench.log" 2>&1
   grep -A30 "^best" "$OUT/a2bench.log" | cut -c1-120 ;;
e) for i in 1 2; do for m in 0 1; do
     KILN_DECODE_FP8_MMA=$m RUN_TAG=-mma$m-$i EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=150 \
       bash benchmarks/gpu_suite.sh fp8:throughput 2>&1 | grep -E "out tok/s|rror" \
       | sed "s/^/[128 mma=$m run $i] /" | tee -a "$OUT/e1.log"
   done; done
   for m in 0 1; do
     KILN_DECODE_FP8_MMA=$m NUM_REQUESTS=300 RUN_TAG=-mma$m EXTRA_ARGS="--load-format dummy" \
       STAGE_TIMEOUT=150 bash benchmarks/gpu_suite.sh fp8:throughput-1k 2>&1 \
       | grep -E "out tok/s|rror" | sed "s/^/[1k x300 mma=$m] /" | tee -a "$OUT/e1.log"
   done ;;
s) timeout 240 python3 benchmarks/int4_scale_dtype.py "$OUT/s1.json" 2>&1 | tee "$OUT/s1.log"
   KILN_INT4_GEMV_TMA=0 timeout 240 python3 benchmarks/int4_scale_dtype.py "$OUT/s2.json" \
     --dtypes float32 2>&1 | tee "$OUT/s2.log" ;;
*) OUT=$OUT bash benchmarks/results/2026-12-07-s60/call.sh "$stage" ;;
esac; done
