#!/usr/bin/env bash
# For the next device session (one H200; written in the 32nd after its device time ran
# out). bf16 batch-1 decode at a 32k context (issue #12: >= 85% of the roofline counting
# KV bytes; 84.8% and 83.3% in the 32nd). The 32nd's sweep at 16 splits (call 4) found
# 128-key tiles, 3 stages, 4 warps at 54.0 us a layer against the default 64 / 2 / 4 at
# 72.5; its 32- and 64-split sweeps ran out of time. So: the attention alone at 32 / 64
# splits (four launches, one layout: ~40 s each), then the 32k engine with
# KILN_DECODE_LONG_TILES=0/1 and KILN_DECODE_MAX_SPLITS=32/64, alternating (~45 s each).
# If a variant wins end to end: make it the default and run its GPU tests
# (tests/test_kernels_gpu.py -k decode).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_kernels_gpu.py \
  -k long_tiles > $OUT/tests-long.log 2>&1; tail -n 3 $OUT/tests-long.log
export SWEEP_SHAPES=1x32000 SWEEP_DTYPES=bf16 SWEEP_LAYOUTS=nhd \
  SWEEP_CONFIGS="64,2,4;128,3,4;128,4,4;128,2,8"
for sp in 32 64; do
  SWEEP_SPLITS=$sp timeout 90 python3 benchmarks/attn_decode_sweep.py $OUT/sweep-s$sp.json \
    > $OUT/sweep-s$sp.log 2>&1; echo "splits $sp"; grep "^B=" $OUT/sweep-s$sp.log
done
L="bench latency --random-config llama-3.1-8b --load-format dummy --input-len 32000 --output-len 128 --num-requests 1 --max-seq-len 32768"
for i in 1 2; do for v in "0 32" "1 32" "1 64"; do set -- $v
  KILN_DECODE_LONG_TILES=$1 KILN_DECODE_MAX_SPLITS=$2 timeout 90 python3 -m kiln.cli $L \
    --out $OUT/long-t$1-s$2-$i.json > $OUT/long-t$1-s$2-$i.log 2>&1
  echo "32k, long tiles $1, max splits $2"; grep -h "^kiln\|HBM" $OUT/long-t$1-s$2-$i.log
done; done
# the same on 64-token cache blocks (cut off in the 32nd's call 4)
timeout 90 python3 -m kiln.cli $L --block-size 64 --out $OUT/long-bs64.json > $OUT/long-bs64.log 2>&1
echo "32k, 64-token blocks"; grep -h "^kiln\|HBM" $OUT/long-bs64.log
# int4 at 64 rows (issue #10's batch-64 row, 0.83x): where a layer's time goes now, the
# magic launches against bf16 cuBLAS (~40 s)
timeout 120 python3 benchmarks/int_batch_bench.py $OUT/int-batch64.json --rows 64 --bits 4 \
  --magic > $OUT/int-batch64.log 2>&1; tail -n 12 $OUT/int-batch64.log
