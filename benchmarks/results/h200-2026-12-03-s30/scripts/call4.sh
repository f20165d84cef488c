#!/usr/bin/env bash
# 30th session, call 4 (one H200): PDL now on by default (call 3: the GPU suite passed
# with it). Throughput must not lose by it: bf16 128 / 128 x 1000 with it and without
# (KILN_PDL=0), then 1000 / 1000 x 300 bf16 (default) and SmoothQuant W8A8 + int8 KV
# (issue #10's ratio, >= 1.3x).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
T="bench throughput --random-config llama-3.1-8b --max-seq-len 2048"
for p in 1 0; do
  KILN_PDL=$p timeout 100 python3 -m kiln.cli $T --load-format dummy --input-len 128 \
    --output-len 128 --num-requests 1000 --out $R/t128-pdl$p.json > $R/t128-pdl$p.log 2>&1
  echo "t128 pdl=$p"; grep -h "^kiln" $R/t128-pdl$p.log; pack
done
K="$T --input-len 1000 --output-len 1000 --num-requests 300"
timeout 120 python3 -m kiln.cli $K --load-format dummy --out $R/bf16-1k.json > $R/bf16-1k.log 2>&1
echo "bf16 1k"; grep -h "^kiln" $R/bf16-1k.log; pack
timeout 230 python3 -m kiln.cli $K --quantization int8_sq --kv-cache-dtype int8 \
  --out $R/sq8-1k.json > $R/sq8-1k.log 2>&1; echo "sq8 1k"; grep -h "^kiln" $R/sq8-1k.log; pack
