#!/usr/bin/env bash
# 33rd session, call 2: long tiles made the default (16-bit caches, splits of >= 1024 keys).
# The GPU decode tests and the engine's compile-nothing test, then the batches the change
# reaches besides batch 1 at 32k: 8 x 4000 in an 8k engine (8 splits of 1,024 keys) and
# 4 x 16000 in a 32k engine (16 splits of 2,048), KILN_DECODE_LONG_TILES 0 / 1 alternating.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_kernels_gpu.py \
  tests/test_gpu_engine.py -k "decode or compile_nothing or warm" > $OUT/tests.log 2>&1
tail -n 3 $OUT/tests.log
B="bench latency --random-config llama-3.1-8b --load-format dummy --output-len 128"
for i in 1 2; do for t in 0 1; do
  KILN_DECODE_LONG_TILES=$t timeout 80 python3 -m kiln.cli $B --input-len 4000 \
    --num-requests 8 --max-seq-len 8192 --out $OUT/b8-t$t-$i.json > $OUT/b8-t$t-$i.log 2>&1
  echo "8 x 4000 (8k engine), long tiles $t"; grep -h "^kiln\|HBM" $OUT/b8-t$t-$i.log
done; done
for t in 0 1; do
  KILN_DECODE_LONG_TILES=$t timeout 90 python3 -m kiln.cli $B --input-len 16000 \
    --num-requests 4 --max-seq-len 32768 --out $OUT/b4-t$t.json > $OUT/b4-t$t.log 2>&1
  echo "4 x 16000 (32k engine), long tiles $t"; grep -h "^kiln\|HBM" $OUT/b4-t$t.log
done
