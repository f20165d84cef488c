#!/usr/bin/env bash
# 31st session, call 6: bf16 batch 1, the defaults against the norms and SiLU*mul in the GEMV prologues
# (KILN_BF16_SWAP=fused, which the GLU and rotary epilogues do not take), and INT4 with and without the attention PDL.
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
for i in 1 2; do run default-$i "" A=1; run fused-$i "" KILN_BF16_SWAP=fused; done
run int4-1 "$I" A=1; run int4noattn-1 "$I" KILN_ATTN_PDL=0
