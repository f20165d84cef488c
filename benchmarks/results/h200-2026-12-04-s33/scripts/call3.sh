#!/usr/bin/env bash
# 33rd session, call 3: long tiles (128 keys) won batch 1 at 32k (85.2 vs 83.4% of the
# roofline) and 4 x 16000 in a 32k engine (TPOT 14.40 vs 14.88 ms) but lost 8 x 4000 in an
# 8k engine (8.44-8.47 vs 8.31-8.32): splits of ~500 real keys, not the 1,024 the static
# test sees. Which tile serves both: the attention alone at 32 splits (1 x 32000 / 16000 /
# 8000), 8 splits (8 x 4000 / 8000) and 16 splits (4 x 16000 / 8000), five launches each.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export SWEEP_DTYPES=bf16 SWEEP_LAYOUTS=nhd SWEEP_CONFIGS="64,2,4;128,3,4;128,2,8;128,2,4;128,3,8"
for run in "32 1x32000;1x16000;1x8000" "8 8x4000;8x8000" "16 4x16000;4x8000"; do
  sp=${run%% *}; shapes=${run#* }
  SWEEP_SPLITS=$sp SWEEP_SHAPES="$shapes" timeout 150 python3 benchmarks/attn_decode_sweep.py \
    $OUT/sweep-s$sp.json > $OUT/sweep-s$sp.log 2>&1; echo "splits $sp"; grep "B=" $OUT/sweep-s$sp.log
done
