#!/usr/bin/env bash
# 32nd session, call 4: bf16 decode attention at batch 1 over a 32,000-token context (the
# 32k target: 84.8% of the roofline in call 1, 85% wanted): context splits 16 / 32 (the
# engine's) / 64, cache blocks of 16 (default) / 64 tokens, both layouts, 12 launches; then
# the 32k engine run with 16- and 64-token blocks.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export SWEEP_SHAPES=1x32000 SWEEP_DTYPES=bf16 \
  SWEEP_CONFIGS="64,2,4;64,3,4;64,4,4;64,2,8;64,3,8;128,2,4;128,3,4;128,4,4;128,2,8;128,3,8;128,4,8;32,3,4"
for bs in 16 64; do for sp in 16 32 64; do
  SWEEP_BS=$bs SWEEP_SPLITS=$sp timeout 100 python3 benchmarks/attn_decode_sweep.py \
    $OUT/sweep-bs$bs-s$sp.json > $OUT/sweep-bs$bs-s$sp.log 2>&1
  echo "bs $bs splits $sp"; grep "^B=" $OUT/sweep-bs$bs-s$sp.log
done; done
L="bench latency --random-config llama-3.1-8b --load-format dummy --input-len 32000 --output-len 128 --num-requests 1 --max-seq-len 32768"
for bs in 16 64; do
  timeout 100 python3 -m kiln.cli $L --block-size $bs --out $OUT/long-bs$bs.json > $OUT/long-bs$bs.log 2>&1
  echo "32k engine, blocks of $bs"; grep -h "^kiln\|HBM" $OUT/long-bs$bs.log
done
