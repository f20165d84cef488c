#!/usr/bin/env bash
# 40th session, call 3: the GPU engine tests after the 39th's host changes; prefill attention against each SDPA backend; where FP8 128/128's
# decode steps spend the ~2.7 ms beyond the 512-row graph's replay (profile + trace gaps).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_engine.py > $OUT/tests.log 2>&1
tail -5 $OUT/tests.log; echo "tests t=$SECONDS"
timeout 120 python3 benchmarks/attn_prefill_sdpa.py --cases 4096,8192,32768,16x1000 > $OUT/attn-sdpa.log 2>&1
timeout 40 python3 benchmarks/attn_prefill_sdpa.py --kv e4m3 --cases 8192 >> $OUT/attn-sdpa.log 2>&1
cat $OUT/attn-sdpa.log; echo "attn t=$SECONDS"
FP8="--quantization fp8 --kv-cache-dtype fp8"
for cpu in 0 1; do
  KILN_PROFILE_CPU=$cpu timeout 150 python3 -m kiln.cli bench throughput --random-config llama-3.1-8b \
    --max-seq-len 2048 --load-format dummy $FP8 --input-len 128 --output-len 128 --num-requests 1000 \
    --profile /tmp/prof$cpu --out /tmp/prof$cpu.json > $OUT/prof$cpu.log 2>&1
  grep -h "^kiln \|steps" $OUT/prof$cpu.log; echo "profile cpu=$cpu t=$SECONDS"
  timeout 120 python3 benchmarks/trace_gaps.py /tmp/prof$cpu/trace.json --min-gap-ms 0.05 --top 30 > $OUT/gaps$cpu.log 2>&1
  head -70 $OUT/gaps$cpu.log; echo "gaps t=$SECONDS"
  [ $cpu = 1 ] && (cd benchmarks && timeout 90 python3 trace_runtime.py /tmp/prof1/trace.json) 2>&1 | tee $OUT/runtime.log
done
