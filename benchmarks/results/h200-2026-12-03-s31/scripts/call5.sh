#!/usr/bin/env bash
# 31st session, call 5: 128 in / 128 out x 1000 with the new defaults against them off
# (bf16), and FP8 with and without the decode attention's PDL.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
T="bench throughput --random-config llama-3.1-8b --max-seq-len 2048 --load-format dummy \
  --input-len 128 --output-len 128 --num-requests 1000"
F="--quantization fp8 --kv-cache-dtype fp8"
run() { local name=$1 q=$2; shift 2
  env "$@" timeout 100 python3 -m kiln.cli $T $q --out $R/t128-$name.json > $R/t128-$name.log 2>&1
  echo "t128 $name ($*)"; grep -h "^kiln" $R/t128-$name.log; pack; }
run default "" A=1; run off "" KILN_SWAP_GLU=0 KILN_SWAP_ROPE=0 KILN_ATTN_PDL=0
run fp8 "$F" A=1; run fp8noattn "$F" KILN_ATTN_PDL=0
