#!/usr/bin/env bash
# 47th session, call 1: the GPU suite's tests after the 46th / 47th changes, --compare-hf
# on an int4 engine (the dequantized reference) on the GPU, then batch-1 latency as time allows.
set -uo pipefail
OUT=${OUT:-gpu-out}; T0=$(date +%s)
STAGE_TIMEOUT=380 bash benchmarks/gpu_suite.sh tests 2>&1 | tail -60 > "$OUT/tests-summary.txt"
cat "$OUT/tests-summary.txt"
(cd "$OUT" && tar czf tests-logs.tgz tests-*.log && rm -f tests-*.log)
export PYTHONPATH=$PWD:/tmp/site KILN_CACHE=/tmp/kiln-cache TQDM_DISABLE=1
timeout 150 python3 -m kiln.cli bench latency --random-config llama-3.2-1b --quantization int4_wo \
  --input-len 128 --output-len 32 --compare-hf --max-seq-len 1024 --kv-fraction 0.5 \
  --out "$OUT/compare-hf-int4-1b.json" > "$OUT/compare-hf-int4.log" 2>&1; echo "exit $?" >> "$OUT/compare-hf-int4.log"
tail -15 "$OUT/compare-hf-int4.log"
left=$(( 560 - $(date +%s) + T0 ))
echo "seconds left: $left"
if [ "$left" -gt 60 ]; then
  timeout $left python3 -m kiln.cli bench latency --random-config llama-3.1-8b --input-len 128 --output-len 256 \
    --max-seq-len 2048 --load-format dummy --quantization int4_wo --group-size 128 --quantize-lm-head \
    --out "$OUT/latency-b1-int4.json" 2>&1 | tail -6
fi
