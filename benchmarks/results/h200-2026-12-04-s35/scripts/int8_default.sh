#!/usr/bin/env bash
# 35th session, call 2 (one H200): the fused W8A8 GEMM made the Hopper default with the tile
# rule from call 1's sweep. Its GPU tests (and the int8 engine ones), the sweep again at the
# rows whose rule changed, then SmoothQuant + int8 KV 1000 / 1000 x 300 with it (default)
# and without it (KILN_INT8_GEMM=torch), bf16 on dummy weights beside them.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_kernels_int8_act.py \
  tests/test_weight_only.py > $OUT/int8-tests.log 2>&1; tail -n 3 $OUT/int8-tests.log
for v in default torch bf16; do
  case $v in
    default) env=""; q="--quantization int8_sq --kv-cache-dtype int8" ;;
    torch) env="KILN_INT8_GEMM=torch"; q="--quantization int8_sq --kv-cache-dtype int8" ;;
    bf16) env=""; q="--load-format dummy" ;;
  esac
  env $env timeout 240 python3 -m kiln.cli bench throughput --random-config llama-3.1-8b \
    --input-len 1000 --output-len 1000 --num-requests 300 --max-seq-len 2048 $q \
    --out $OUT/sq8-1k-$v.json > $OUT/sq8-1k-$v.log 2>&1
  echo "1000/1000 x 300, $v"; grep -h "out tok/s\|output tok" $OUT/sq8-1k-$v.log | tail -2
done
timeout 100 python3 benchmarks/int8_gemm_bench.py $OUT/int8_gemm.json --rows 32,64,256,512 \
  > $OUT/int8_gemm.log 2>&1; grep "layer\|MISMATCH" $OUT/int8_gemm.log
