#!/usr/bin/env bash
# ran at commit c70b65b (the presum launches and int_batch_bench --presum, reverted after
# this call measured them slower: BENCHMARKS.md, 33rd session)
# 33rd session, call 6 (the last ~300 s of device time): the pre-summed int4 tiles
# (IntGemmConfig.presum) at 64 rows beside kiln's launch and bf16 cuBLAS; the err column
# checks them against float32.
set -u
export PYTHONPATH=$PWD TQDM_DISABLE=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
timeout 150 python3 benchmarks/int_batch_bench.py $OUT/int-presum.json --rows 64 --bits 4 \
  --presum 2>&1 | tee $OUT/int-presum.log | grep -v "^ *$"
