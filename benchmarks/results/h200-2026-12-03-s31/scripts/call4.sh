#!/usr/bin/env bash
# 31st session, call 4: the 8B rotary test again (M = 1: no k written), bf16 batch 1
# with the defaults against each of them off and against them asked for by name, alternating.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_gemv_swap_epilogues.py \
  -k rope_at_8b > $R/tests.log 2>&1; tail -n 3 $R/tests.log; pack
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
  --input-len 128 --output-len 256"
run() { local name=$1 q=$2; shift 2
  env "$@" timeout 70 python3 -m kiln.cli $B $q --out $R/b1-$name.json > $R/b1-$name.log 2>&1
  echo "b1 $name ($*)"; grep -h "^kiln" $R/b1-$name.log; pack; }
OFF="KILN_SWAP_GLU=0 KILN_SWAP_ROPE=0 KILN_ATTN_PDL=0"; ON="KILN_SWAP_GLU=1 KILN_SWAP_ROPE=1 KILN_ATTN_PDL=1"
for i in 1 2; do run default-$i "" A=1; run off-$i "" $OFF; run named-$i "" $ON; done
