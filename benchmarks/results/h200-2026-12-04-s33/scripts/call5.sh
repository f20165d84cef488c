#!/usr/bin/env bash
# 33rd session, call 5: the final rule's GPU tests (long tiles, the engine's compile-
# nothing test), then 8 x 4000 in an 8k engine, default against KILN_DECODE_LONG_TILES=0
# on one card (call 4's 8.46 ms came from a card whose batch 1 ran 236.0 tok/s, not 239).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_kernels_gpu.py \
  tests/test_gpu_engine.py -k "long_tiles or compile_nothing" > $OUT/tests.log 2>&1
tail -n 3 $OUT/tests.log
B="bench latency --random-config llama-3.1-8b --load-format dummy --output-len 128"
for t in 1 0; do
  KILN_DECODE_LONG_TILES=$t timeout 70 python3 -m kiln.cli $B --input-len 4000 \
    --num-requests 8 --max-seq-len 8192 --out $OUT/b8-t$t.json > $OUT/b8-t$t.log 2>&1
  echo "8 x 4000 (8k engine), KILN_DECODE_LONG_TILES=$t"; grep -h "^kiln\|HBM" $OUT/b8-t$t.log
done
