#!/usr/bin/env bash
# 54th session, call 1 (nvidia-h200; carry .whl): int4 / int8 linears at prompt rows
# (65-256: batch-1 latency's 128-token prompt runs its linears at 128 rows; TTFT 25.7 ms),
# then where an int4 batch-1 step goes (--profile, trace_gaps --by-kernel)
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 260 python3 benchmarks/int_prefill_bench.py "$OUT/prefill.json" --rows 65,128,256 \
  > "$OUT/prefill.log" 2>&1; grep -A40 "^a layer" "$OUT/prefill.log" || tail -5 "$OUT/prefill.log"
Q="--max-seq-len 2048 --load-format dummy --quantize-lm-head --quantization int4_wo --group-size 128"
timeout 200 python3 -m kiln.cli bench latency --random-config llama-3.1-8b --input-len 128 \
  --output-len 256 $Q --profile /tmp/prof-int4 --out "$OUT/prof-int4.json" > "$OUT/prof-int4.log" 2>&1
grep -v "^$" "$OUT/prof-int4.log" | tail -30
timeout 100 python3 benchmarks/trace_gaps.py /tmp/prof-int4/trace.json --by-kernel \
  > "$OUT/gaps-int4.log" 2>&1; head -60 "$OUT/gaps-int4.log"
