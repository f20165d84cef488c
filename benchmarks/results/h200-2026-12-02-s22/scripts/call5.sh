#!/usr/bin/env bash
# Call 5: where FP8 prefill goes (1000 requests of 1000 in / 2 out: prompt steps only,
# 16384 tokens a step) under torch.profiler, kernels by GPU time.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
timeout 200 python3 -m kiln.cli bench throughput --random-config llama-3.1-8b --input-len 1000 \
  --output-len 2 --num-requests 1000 --max-seq-len 2048 --load-format dummy --quantization fp8 \
  --kv-cache-dtype fp8 --profile /tmp/profpf --out $R/profprefill-fp8.json > $R/profprefill-fp8.log 2>&1
grep -v "^$" $R/profprefill-fp8.log | tail -40; pack
