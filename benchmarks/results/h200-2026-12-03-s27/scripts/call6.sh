#!/usr/bin/env bash
# 27th session, call 6: the swapped FP8 GEMM on the quantized LM head (M = 1 / 16); batch-1
# FP8 small kernels and e4m3 decode launches; last, the swapped GEMM at 17-64 tokens (token
# tiles of 32 / 64) against the current 64-row wgmma tile, M = 32 and 64, a run per shape.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
# the LM head quantized (--quantize-lm-head: 128256 x 4096), swapped since this session
timeout 110 python3 benchmarks/fp8_gemm.py --grid --swap --ms 1,16 --shapes 128256:4096 \
  --out $R/grid_head.json > $R/grid_head.log 2>&1; grep "M=" $R/grid_head.log; pack
# batch-1 FP8 small kernels: act_mul_quant / add_rms_norm + e4m3 launches at 1 and 4 rows,
# and the e4m3 decode launches at batch 1 with the engine's 8 splits
timeout 90 python3 benchmarks/small_kernels_bench.py $R/small_b1.json --ms 1,4 > $R/small_b1.log 2>&1
grep -v logits $R/small_b1.log; pack
timeout 120 python3 benchmarks/attn_decode_vt.py $R/vt_b1.json --sweep --kv e4m3 --splits 8 \
  --decode 1x256,1x512,4x384 > $R/vt_b1.log 2>&1
grep "^decode" $R/vt_b1.log | head -40; pack
# last (cut if the budget runs out): 17-64 rows
for nk in 4096:4096 6144:4096 4096:14336 28672:4096; do
  timeout 110 python3 benchmarks/fp8_gemm.py --grid --swap --ms 32,64 --shapes $nk \
    --out $R/grid64_${nk/:/x}.json > $R/grid64_${nk/:/x}.log 2>&1
  grep "M=" $R/grid64_${nk/:/x}.log; pack
done
