#!/usr/bin/env bash
# 38th session, call 4: 128 / 128 x 1000, bf16 and FP8 + FP8 KV, decode graph routes off / on.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
run() {  # tag route args...
  local tag=$1 r=$2; shift 2
  KILN_GRAPH_ROUTE=$r timeout 100 python3 -m kiln.cli bench throughput \
    --random-config llama-3.1-8b --max-seq-len 2048 --load-format dummy \
    --input-len 128 --output-len 128 --num-requests 1000 "$@" \
    --out $OUT/$tag-r$r.json > $OUT/$tag-r$r.log 2>&1
  echo "$tag route=$r $(grep -h '^kiln ' $OUT/$tag-r$r.log | tail -1) t=$SECONDS"
  grep -h "^decode steps" $OUT/$tag-r$r.log
}
for r in 0 1; do [ $SECONDS -lt 200 ] && run bf16s128 $r; done
for r in 1 0; do [ $SECONDS -lt 240 ] && run fp8s128b $r --quantization fp8 --kv-cache-dtype fp8; done
rm -f $OUT/*.json $OUT/*.png
