#!/usr/bin/env bash
# 38th session, call 3: decode graphs replayed for faster (larger) buckets (KILN_GRAPH_ROUTE,
# kiln/runtime/cuda_graphs.py route_buckets): the GPU tests, then 1000 / 1000 x 300 FP8 + FP8
# KV and bf16, and 128 / 128 x 1000 FP8, with routes off / on alternating.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_gpu_engine.py \
  -k "graph_routes or graphs_and_overlap" > $OUT/tests.log 2>&1; tail -n 2 $OUT/tests.log
run() {  # tag route args...
  local tag=$1 r=$2; shift 2
  KILN_GRAPH_ROUTE=$r timeout 170 python3 -m kiln.cli bench throughput \
    --random-config llama-3.1-8b --max-seq-len 2048 --load-format dummy "$@" \
    --out $OUT/$tag-r$r.json > $OUT/$tag-r$r.log 2>&1
  echo "$tag route=$r $(grep -h '^kiln ' $OUT/$tag-r$r.log | tail -1) t=$SECONDS"
  grep -h "replayed for faster\|^decode steps" $OUT/$tag-r$r.log | cut -c 1-400
}
FP8="--quantization fp8 --kv-cache-dtype fp8"
K1="--input-len 1000 --output-len 1000 --num-requests 300"
for r in 0 1; do run fp8k1a $r $FP8 $K1; done
for r in 0 1; do [ $SECONDS -lt 330 ] && run bf16k1 $r $K1; done
for r in 0 1; do [ $SECONDS -lt 420 ] && run fp8s128 $r $FP8 --input-len 128 --output-len 128 --num-requests 1000; done
for r in 0 1; do [ $SECONDS -lt 480 ] && run fp8k1b $r $FP8 $K1; done
rm -f $OUT/*.json
