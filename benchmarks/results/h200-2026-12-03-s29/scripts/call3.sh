#!/usr/bin/env bash
# 29th session, call 3 (one H200; call 1 again after its fixes: default launches that fit, the norm pre-pass a row at a time in row-wide loads): the swapped bf16 decode GEMV (kiln.kernels.gemv_swap,
# KILN_BF16_SWAP=1, opt-in): its GPU tests (kernel at 8B shapes, engines through
# CUDA graphs), the kernel against cuBLAS alone and with the kernel before it
# (benchmarks/gemv_swap_bench.py --grid), then bf16 batch 1 with it on / off, alternating.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
P="python3 -m pytest -q -m gpu -p no:cacheprovider -rf"
timeout 150 $P tests/test_gemv_swap.py > $R/tests-gemv-swap.log 2>&1
tail -n 3 $R/tests-gemv-swap.log; pack
timeout 200 python3 benchmarks/gemv_swap_bench.py $R/gemv_swap.json --grid --budget 60 \
  > $R/gemv_swap.log 2>&1; grep -v "^   " $R/gemv_swap.log; pack
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
  --input-len 128 --output-len 256"
for i in 1 2; do for s in 1 0; do
  KILN_BF16_SWAP=$s timeout 70 python3 -m kiln.cli $B --out $R/b1-swap$s-$i.json \
    > $R/b1-swap$s-$i.log 2>&1
  echo "b1 swap=$s"; grep -h "^kiln" $R/b1-swap$s-$i.log; pack
done; done
