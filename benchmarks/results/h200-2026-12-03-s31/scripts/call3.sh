#!/usr/bin/env bash
# 31st session, call 3: the 8B rotary test's bound, batch 1 on the new defaults (bf16,
# INT4), FP8 with and without the decode attention's PDL (now on for FP8 engines too).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_gemv_swap_epilogues.py \
  -k rope_at_8b > $R/tests.log 2>&1; tail -n 3 $R/tests.log; pack
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
  --input-len 128 --output-len 256"
F="--quantization fp8 --kv-cache-dtype fp8 --quantize-lm-head"
I="--quantization int4_wo --group-size 128 --quantize-lm-head"
run() { local name=$1 q=$2; shift 2
  env "$@" timeout 70 python3 -m kiln.cli $B $q --out $R/b1-$name.json > $R/b1-$name.log 2>&1
  echo "b1 $name ($*)"; grep -h "^kiln" $R/b1-$name.log; pack; }
run bf16-1 "" A=1; run fp8-1 "$F" A=1; run fp8noattn-1 "$F" KILN_ATTN_PDL=0
run int4-1 "$I" A=1; run bf16-2 "" A=1; run fp8noattn-2 "$F" KILN_ATTN_PDL=0; run fp8-2 "$F" A=1
