#!/usr/bin/env bash
# 35th session, call 4 (one H200): the long-engine GPU tests whose log call 3 lost, then
# SmoothQuant + int8 KV 1000 / 1000 x 300 again, alternating fused (default) / bf16 / torch
# (KILN_INT8_GEMM=torch) rounds, for medians beside call 2's runs.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_gpu_engine.py \
  -k "long_engine or compile_nothing" > $OUT/tests.log 2>&1; tail -n 2 $OUT/tests.log
for round in 1 2; do
  for v in default bf16 torch; do
    [ $SECONDS -gt 470 ] && break 2
    case $v in
      default) env=""; q="--quantization int8_sq --kv-cache-dtype int8" ;;
      torch) env="KILN_INT8_GEMM=torch"; q="--quantization int8_sq --kv-cache-dtype int8" ;;
      bf16) env=""; q="--load-format dummy" ;;
    esac
    env $env timeout 200 python3 -m kiln.cli bench throughput --random-config llama-3.1-8b \
      --input-len 1000 --output-len 1000 --num-requests 300 --max-seq-len 2048 $q \
      --out $OUT/r$round-$v.json > $OUT/r$round-$v.log 2>&1
    echo "round $round $v $(grep -h '^kiln ' $OUT/r$round-$v.log | tail -1) t=$SECONDS"
  done
done
