#!/usr/bin/env bash
# 36th session, call 2 (one H200): the W8A8 GEMM's 32-row tiles at 17-32 rows (GPU bit-for-bit
# tests and the layer bench at 20 / 24 / 32 rows), the fused int8 inputs now on by default
# (engine test), then the 35th's part b: bf16 batch 1 x3 (#12's 240 tok/s) and SmoothQuant
# batch 1 with the fused inputs off / on.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_kernels_int8_act.py \
  -k "int8_gemm or fused" > $OUT/int8-tests.log 2>&1; tail -n 2 $OUT/int8-tests.log
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_gpu_engine.py \
  -k "fused_activation_quant or int8" > $OUT/engine-tests.log 2>&1; tail -n 2 $OUT/engine-tests.log
timeout 60 python3 benchmarks/int8_gemm_bench.py $OUT/int8_gemm.json --rows 20,24,32 \
  > $OUT/int8_gemm.log 2>&1; grep "layer\|MISMATCH" $OUT/int8_gemm.log
for i in 1 2 3; do
  [ $SECONDS -gt 330 ] && break
  RUN_TAG=-$i timeout 100 bash benchmarks/gpu_suite.sh latency-b1 > $OUT/b1-bf16-$i.log 2>&1
  echo "bf16 b1 run $i: $(grep -h '^kiln ' $OUT/b1-bf16-$i.log | tail -1) t=$SECONDS"
done
for f in 0 1; do
  [ $SECONDS -gt 420 ] && break
  KILN_INT8_FUSED_QUANT=$f RUN_TAG=-f$f timeout 120 bash benchmarks/gpu_suite.sh sq8:latency-b1 \
    > $OUT/b1-sq8-f$f.log 2>&1
  echo "sq8 b1 fused inputs $f: $(grep -h '^kiln ' $OUT/b1-sq8-f$f.log | tail -1) t=$SECONDS"
done
rm -f $OUT/*.png $OUT/*.json
