#!/usr/bin/env bash
# 33rd session, call 4: the new default (long tiles in engines of >= 16k tokens) with no
# setting: batch 1 at 32k (expect call 1's 85.2%), 8 x 4000 in an 8k engine (expect the
# 64-key tiles' TPOT 8.31 ms), and bf16 batch 1 128 / 256 (unchanged path: 239 tok/s).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
B="bench latency --random-config llama-3.1-8b --load-format dummy"
timeout 90 python3 -m kiln.cli $B --input-len 32000 --output-len 128 --max-seq-len 32768 \
  --out $OUT/long.json > $OUT/long.log 2>&1
echo "32k batch 1"; grep -h "^kiln\|HBM\|warm" $OUT/long.log
timeout 80 python3 -m kiln.cli $B --input-len 4000 --output-len 128 --num-requests 8 \
  --max-seq-len 8192 --out $OUT/b8.json > $OUT/b8.log 2>&1
echo "8 x 4000, 8k engine"; grep -h "^kiln\|HBM" $OUT/b8.log
timeout 80 python3 -m kiln.cli $B --input-len 128 --output-len 256 --out $OUT/b1.json \
  > $OUT/b1.log 2>&1
echo "batch 1, 128 / 256"; grep -h "^kiln\|HBM" $OUT/b1.log
