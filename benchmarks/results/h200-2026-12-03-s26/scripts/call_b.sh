#!/usr/bin/env bash
# Max batch 512 (kiln bench's default) against 1024 (vLLM's default on an H100 / H200), one
# after the other on one engine: FP8 + FP8 KV 1000 / 1000 x 1000 and 128 / 128 x 1000, bf16
# 128 / 128 x 1000. A 1-byte cache holds ~1.6M tokens here, but the pool is capped at max
# batch x max_seq_len (1.05M at 512), so 1024 also lets ~800 rows of 1000 / 1000 decode.
# First: torch._scaled_mm with rowwise scales (kiln's FP8 scheme) vs tensorwise (static
# activations, per-tensor weights) vs bf16, the GEMM alone (fp8_gemm.py --scaling).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
one() {  # one NAME TIMEOUT ARGS...
  local name=$1 t=$2; shift 2
  timeout "$t" python3 -m kiln.cli bench throughput --random-config llama-3.1-8b --load-format dummy \
    --max-seq-len 2048 "$@" --out $R/$name.json > $R/$name.log 2>&1
  echo "== $name rc=$?"; grep -E "tok/s|decode steps|prompt steps|KV|preempt|floor|compil" $R/$name.log | head -12
  pack
}
timeout 120 python3 benchmarks/fp8_gemm.py --scaling --ms 128,512,1024,4096,16384 \
  --out $R/fp8_scaling.json > $R/fp8_scaling.log 2>&1; tail -62 $R/fp8_scaling.log; pack
F8="--quantization fp8 --kv-cache-dtype fp8"
for mb in 512 1024; do
  one fp8-128-mb$mb 150 $F8 --input-len 128 --output-len 128 --num-requests 1000 --max-batch-size $mb
done
for mb in 1024 512; do
  one bf16-128-mb$mb 150 --input-len 128 --output-len 128 --num-requests 1000 --max-batch-size $mb
done
for mb in 1024 512; do
  one fp8-1k-mb$mb 200 $F8 --input-len 1000 --output-len 1000 --num-requests 1000 --max-batch-size $mb
done
