#!/usr/bin/env bash
# 30th session, call 6 (one H200): the small kernels' PDL now follows the engine's linears
# (off behind integer GEMVs: call 5 had INT4 batch 1 at 362.2 with it, 372.1 without).
# INT4 and INT8 weight-only batch 1 on the defaults against KILN_PDL=0; bf16 once more.
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
W="--quantization int8_wo --quantize-lm-head"
run int4-on "$I" KILN_X=1; run int4-off "$I" KILN_PDL=0
run int8-on "$W" KILN_X=1; run int8-off "$W" KILN_PDL=0
run bf16-on "" KILN_X=1
