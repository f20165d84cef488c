#!/usr/bin/env bash
# 30th session, call 5 (one H200): batch 1 on the committed defaults (PDL on, no env)
# against KILN_PDL=0, alternating: bf16, INT4 (RTN g128, head quantized), FP8 + FP8 KV
# with the head in e4m3.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
  --input-len 128 --output-len 256"
run() { local name=$1 q=$2; shift 2
  env "$@" timeout 70 python3 -m kiln.cli $B $q --out $R/b1-$name.json > $R/b1-$name.log 2>&1
  echo "b1 $name ($*)"; grep -h "^kiln" $R/b1-$name.log; pack; }
I="--quantization int4_wo --group-size 128 --quantize-lm-head"
F="--quantization fp8 --kv-cache-dtype fp8 --quantize-lm-head"
run bf16-on "" KILN_X=1; run bf16-off "" KILN_PDL=0
run int4-on "$I" KILN_X=1; run int4-off "$I" KILN_PDL=0
run fp8-on "$F" KILN_X=1; run fp8-off "$F" KILN_PDL=0
run bf16-on2 "" KILN_X=1; run int4-on2 "$I" KILN_X=1
