#!/usr/bin/env bash
# Does Python's garbage collector cost the device time? FP8 + FP8 KV 1000 / 1000 x 300,
# the collector on (kiln as it is) and off for the whole run (gc.disable before kiln
# starts), alternating, two pairs. The 45th session's call 1 had 2.3 s of collection
# pauses (28 full, the longest 58 ms) in a 63 s run.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
ARGS="bench throughput --random-config llama-3.1-8b --max-seq-len 2048 --load-format dummy
  --quantization fp8 --kv-cache-dtype fp8 --input-len 1000 --output-len 1000 --num-requests 300"
for i in 1 2; do
  for g in on off; do
    [ $SECONDS -gt 400 ] && break 2
    timeout 110 python3 -c "
import gc, sys
if '$g' == 'off': gc.disable()
from kiln.cli import main
sys.argv = ['kiln'] + '''$ARGS'''.split() + ['--out', '$OUT/gc$g-$i.json']
main()" > $OUT/gc$g-$i.log 2>&1
    echo "gc=$g #$i $(grep -h '^kiln ' $OUT/gc$g-$i.log | tail -1) t=$SECONDS"
    grep -h "garbage\|^decode steps\|^prompt steps\|step time p50" $OUT/gc$g-$i.log | cut -c 1-220
  done
done
rm -f $OUT/*.json $OUT/*.png
