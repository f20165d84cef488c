#!/usr/bin/env bash
# 30th session, call 2 (one H200): call 1 found the swapped GEMV's PDL launch faster
# without the L2 prefetch (232.0 vs 228.6 tok/s) and the prefetch slower (8 MB 226.9,
# 24 MB 213.7; FP8 323.6 -> 313.9), the best being every small kernel PDL-launched too
# (KILN_PDL=1, 233.7 with 8 MB). Here, alternating, twice: off, the small kernels' PDL
# alone, and both without prefetch; FP8 + FP8 KV with all of it against none.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
  --input-len 128 --output-len 256"
run() { local name=$1 q=$2; shift 2
  env "$@" timeout 60 python3 -m kiln.cli $B $q --out $R/b1-$name.json > $R/b1-$name.log 2>&1
  echo "b1 $name ($*)"; grep -h "^kiln" $R/b1-$name.log; pack; }
F="--quantization fp8 --kv-cache-dtype fp8"
for i in 1 2; do
  run off-$i "" KILN_SWAP_PDL=0 KILN_PDL=0
  run small-$i "" KILN_SWAP_PDL=0 KILN_PDL=1
  run all0-$i "" KILN_SWAP_PDL=1 KILN_SWAP_PREFETCH_MB=0 KILN_PDL=1
  run fp8off-$i "$F" KILN_SWAP_PDL=0 KILN_PDL=0
  run fp8all-$i "$F" KILN_SWAP_PDL=1 KILN_SWAP_PREFETCH_MB=0 KILN_PDL=1
done
