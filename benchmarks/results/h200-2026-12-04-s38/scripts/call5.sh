#!/usr/bin/env bash
# 38th session, call 5: a batch that sits on a cliff of cuBLAS's bf16 tiles (440 requests:
# the 448 bucket, whose graph replays in 16.1 ms against 12.0 for the 480 one), routes on / off.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
for r in 1 0; do
  [ $SECONDS -gt 100 ] && break
  KILN_GRAPH_ROUTE=$r timeout 70 python3 -m kiln.cli bench throughput \
    --random-config llama-3.1-8b --max-seq-len 2048 --load-format dummy \
    --input-len 128 --output-len 512 --num-requests 440 --out $OUT/b440-r$r.json > $OUT/b440-r$r.log 2>&1
  echo "route=$r $(grep -h '^kiln ' $OUT/b440-r$r.log | tail -1) t=$SECONDS"
  grep -h "^decode steps\|^steps" $OUT/b440-r$r.log
done
rm -f $OUT/*.json $OUT/*.png
