#!/usr/bin/env bash
# 32nd session, call 3: the GPU tests on the new defaults (KILN_INT_ROW_TILES, KILN_INT_GLU,
# KILN_INT_ROPE, KILN_ROTARY_EXACT all on), then INT4 and bf16 batch 1 on them.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
STAGE_TIMEOUT=400 timeout 420 bash benchmarks/gpu_suite.sh tests > $OUT/suite.log 2>&1
for g in a b c e; do echo "group $g"; tail -n 4 $OUT/tests-$g.log; done
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 --input-len 128 --output-len 256"
timeout 70 python3 -m kiln.cli $B --quantization int4_wo --group-size 128 --quantize-lm-head \
  --out $OUT/b1-int4.json > $OUT/b1-int4.log 2>&1; echo "int4 b1"; grep -h "^kiln" $OUT/b1-int4.log
timeout 70 python3 -m kiln.cli $B --out $OUT/b1-bf16.json > $OUT/b1-bf16.log 2>&1; echo "bf16 b1"; grep -h "^kiln" $OUT/b1-bf16.log
