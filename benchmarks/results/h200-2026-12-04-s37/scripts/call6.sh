#!/usr/bin/env bash
# 37th session, call 6: SmoothQuant + int8 KV (the int8 KV dots in float16 and the W8A8
# GEMM's rows past M spread, both now default) against bf16, 1000 / 1000 x 300, alternating
# twice in one call; then a decode step of 296 requests profiled (profile_decode's fixed
# timing) if time is left.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
for round in 1 2; do
  for v in sq8 bf16; do
    [ $SECONDS -gt 440 ] && break 2
    case $v in
      sq8) q="--quantization int8_sq --kv-cache-dtype int8" ;;
      bf16) q="--load-format dummy" ;;
    esac
    timeout 200 python3 -m kiln.cli bench throughput --random-config llama-3.1-8b \
      --input-len 1000 --output-len 1000 --num-requests 300 --max-seq-len 2048 $q \
      --out $OUT/r$round-$v.json > $OUT/r$round-$v.log 2>&1
    echo "round $round $v $(grep -h '^kiln ' $OUT/r$round-$v.log | tail -1) t=$SECONDS"
    grep -h "decode steps\|floor" $OUT/r$round-$v.log
  done
done
if [ $SECONDS -lt 470 ]; then
  e=$(ls -d /tmp/kiln-cache/engines/random-llama-3.1-8b-*int8_sq* | head -1)
  timeout 110 python3 benchmarks/profile_decode.py $e --profile-only --profile-batch 296 \
    --context 1500 --kv-fraction 0.75 > $OUT/profile-sq8.log 2>&1
  grep "decode:\|GPU kernel time" $OUT/profile-sq8.log
fi
rm -f $OUT/*.png $OUT/*.json
