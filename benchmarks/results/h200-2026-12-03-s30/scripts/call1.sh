#!/usr/bin/env bash
# 30th session, call 1 (one H200): the swapped bf16 GEMV launched with PDL behind the
# kernels before it, asking L2 for its first weight bytes while they run (KILN_SWAP_PDL,
# KILN_SWAP_PREFETCH_MB): its GPU tests, then batch 1 against it off, alternating; last,
# the same L2 prefetch in the swapped FP8 GEMM (KILN_FP8_PREFETCH_MB), FP8 + FP8 KV.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_gemv_swap.py \
  tests/test_kernels_fp8.py -k "pdl or 8b or prefetch_keeps" > $R/tests-swap.log 2>&1; tail -n 3 $R/tests-swap.log; pack
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
  --input-len 128 --output-len 256"
run() { local name=$1; shift
  env "$@" timeout 60 python3 -m kiln.cli $B --out $R/b1-$name.json > $R/b1-$name.log 2>&1
  echo "b1 $name ($*)"; grep -h "^kiln" $R/b1-$name.log; pack; }
for i in 1 2; do
  run off-$i KILN_SWAP_PDL=0
  [ $i = 1 ] && run mb0-$i KILN_SWAP_PDL=1 KILN_SWAP_PREFETCH_MB=0
  run mb8-$i KILN_SWAP_PDL=1 KILN_SWAP_PREFETCH_MB=8
  run mb24-$i KILN_SWAP_PDL=1 KILN_SWAP_PREFETCH_MB=24
  run all8-$i KILN_SWAP_PDL=1 KILN_SWAP_PREFETCH_MB=8 KILN_PDL=1
done
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_gemv_swap.py \
  -k "engine" > $R/tests-engine.log 2>&1; tail -n 3 $R/tests-engine.log; pack
F="$B --quantization fp8 --kv-cache-dtype fp8"
for mb in 0 8; do
  KILN_FP8_PREFETCH_MB=$mb timeout 60 python3 -m kiln.cli $F --out $R/fp8-mb$mb.json \
    > $R/fp8-mb$mb.log 2>&1; echo "fp8 b1 prefetch $mb MB"; grep -h "^kiln" $R/fp8-mb$mb.log; pack
done
