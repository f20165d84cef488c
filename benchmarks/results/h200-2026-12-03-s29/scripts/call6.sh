#!/usr/bin/env bash
# 29th session, call 6 (one H200): bf16 batch 1 with the plain swapped GEMV
# (KILN_BF16_SWAP=1: no prologue; the norms and SiLU*mul keep their kernels) on / off,
# alternating, twice (call 5: the plain kernel beat cuBLAS at every shape, the fused
# prologues did not); first the engine tests of both modes.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_gemv_swap.py \
  -k engine > $R/tests-engine-swap.log 2>&1; tail -n 2 $R/tests-engine-swap.log; pack
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
  --input-len 128 --output-len 256"
for i in 1 2; do for s in 1 0; do
  KILN_BF16_SWAP=$s timeout 60 python3 -m kiln.cli $B --out $R/b1-plain$s-$i.json \
    > $R/b1-plain$s-$i.log 2>&1; echo "b1 plain swap=$s"; grep -h "^kiln" $R/b1-plain$s-$i.log
  pack
done; done
