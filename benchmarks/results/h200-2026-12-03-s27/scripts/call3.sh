#!/usr/bin/env bash
# 27th session, call 3 (one H200): the swapped-operand FP8 decode GEMM (kiln.kernels.fp8_swap):
# the launch grid at M = 1 / 16 against the current tile (a run per shape), then FP8 + FP8 KV
# batch 1 (128 in / 256 out, --quantize-lm-head) with the picked launches vs without,
# alternating, two runs each.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
S=benchmarks/results/h200-2026-12-03-s27/scripts
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
J=""
for nk in 4096:4096 6144:4096 4096:14336 28672:4096; do
  timeout 100 python3 benchmarks/fp8_gemm.py --grid --swap --ms 1,16 --shapes $nk \
    --out $R/grid_swap_$nk.json > $R/grid_swap_$nk.log 2>&1
  grep "M=" $R/grid_swap_$nk.log; [ -f $R/grid_swap_$nk.json ] && J="$J${J:+,}$R/grid_swap_$nk.json"
  pack
done
python3 $S/swap_pick.py $J | tee $R/picks.log
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
  --quantization fp8 --kv-cache-dtype fp8 --quantize-lm-head --input-len 128 --output-len 256"
for i in 1 2; do
  timeout 75 python3 -m kiln.cli $B --out $R/b1-base$i.json > $R/b1-base$i.log 2>&1
  timeout 75 python3 $S/swap_pick.py $J $B --out $R/b1-swap$i.json > $R/b1-swap$i.log 2>&1
  grep -h "^kiln" $R/b1-base$i.log $R/b1-swap$i.log; pack
done
