#!/usr/bin/env bash
# 29th session, call 5 (one H200): the swapped bf16 GEMV after call 4 (prologue inputs as
# [16, K-step] tiles again, pipelined by cp.async with the weight; launches that fit float32
# weights): its GPU tests, the kernel against cuBLAS (alone / with the kernel before it),
# then bf16 batch 1 with KILN_BF16_SWAP on / off, alternating, twice. Beside the tests,
# engine tests with the decode splits combined in the decode kernel, now the default.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_gemv_swap.py \
  > $R/tests-gemv-swap.log 2>&1 &
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_gpu_engine.py \
  -k "graphs or sinks or mixed or tma" > $R/tests-engine.log 2>&1 &
wait; tail -n 2 $R/tests-gemv-swap.log $R/tests-engine.log; pack
timeout 150 python3 benchmarks/gemv_swap_bench.py $R/gemv_swap.json --grid --budget 100 \
  > $R/gemv_swap.log 2>&1; grep -v "^   " $R/gemv_swap.log; pack
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
  --input-len 128 --output-len 256"
for i in 1 2; do for s in 1 0; do
  KILN_BF16_SWAP=$s timeout 60 python3 -m kiln.cli $B --out $R/b1-swap$s-$i.json \
    > $R/b1-swap$s-$i.log 2>&1; echo "b1 swap=$s"; grep -h "^kiln" $R/b1-swap$s-$i.log; pack
done; done
