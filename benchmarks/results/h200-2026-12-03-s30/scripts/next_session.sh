#!/usr/bin/env bash
# For the next device session (one H200; written in the 30th, not run: its device time ran
# out). Two opt-in changes, their GPU tests first, then batch 1 with each on and off,
# alternating, twice:
# - KILN_SWAP_GLU=1: act(gate) * up in the gate-up GEMV's epilogue (bf16; the SiLU*mul
#   launch gone; 238.0 tok/s without it in the 30th, the target 240);
# - KILN_INT_PDL=1: the one-row INT4 GEMV PDL-launched, and the small kernels with it in
#   INT4 engines (372.1 without it in the 30th; the PDL of the swapped bf16 GEMV gave +4.2%);
# - KILN_ATTN_PDL=1: the decode attention PDL-launched behind the rotary + KV write;
# - KILN_SWAP_ROPE=1: the rotary + KV write in the QKV GEMV's epilogue (that launch gone).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_gemv_swap.py \
  tests/test_gemv_swap_epilogues.py tests/test_kernels_int_pairs.py -k "glu or pdl or rope" > $R/tests.log 2>&1; tail -n 3 $R/tests.log
pack
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
  --input-len 128 --output-len 256"
I="--quantization int4_wo --group-size 128 --quantize-lm-head"
run() { local name=$1 q=$2; shift 2
  env "$@" timeout 70 python3 -m kiln.cli $B $q --out $R/b1-$name.json > $R/b1-$name.log 2>&1
  echo "b1 $name ($*)"; grep -h "^kiln" $R/b1-$name.log; pack; }
for i in 1 2; do
  run glu1-$i "" KILN_SWAP_GLU=1; run glu0-$i "" KILN_SWAP_GLU=0
  run attn1-$i "" KILN_ATTN_PDL=1; run rope1-$i "" KILN_SWAP_ROPE=1
  run all3-$i "" KILN_ATTN_PDL=1 KILN_SWAP_GLU=1 KILN_SWAP_ROPE=1
  run int4pdl1-$i "$I" KILN_INT_PDL=1; run int4pdl0-$i "$I" KILN_INT_PDL=0
done
