#!/usr/bin/env bash
# 27th session, call 5 (one H200): GPU tests after the swapped FP8 decode GEMM became the
# default (M <= 16, K < 8192, Hopper), int8's transposed decode launch changed and greedy
# sampling took a chunked argmax; then FP8 + FP8 KV batch 1 (--quantize-lm-head), this tree
# against the session's start (ab_old/: `git archive 71633d4 kiln benchmarks`), alternating,
# two runs each; the small kernels at one row.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_kernels_fp8.py \
  tests/test_kernels_kvquant.py tests/test_fp8_mid.py tests/test_kernels_gpu.py \
  > $R/tests-kernels.log 2>&1 &
timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_gpu_engine.py \
  -k "fp8 or v_transposed or parallel_compile or steps_after_load" > $R/tests-engine.log 2>&1
wait; tail -2 $R/tests-kernels.log $R/tests-engine.log; pack
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
  --quantization fp8 --kv-cache-dtype fp8 --quantize-lm-head --input-len 128 --output-len 256"
for i in 1 2; do
  timeout 75 python3 -m kiln.cli $B --out $R/b1-new$i.json > $R/b1-new$i.log 2>&1
  (cd ab_old && PYTHONPATH=$PWD timeout 75 python3 -m kiln.cli $B --out $R/b1-old$i.json > $R/b1-old$i.log 2>&1)
  grep -h "^kiln" $R/b1-new$i.log $R/b1-old$i.log; pack
done
# batch-1 small kernels: greedy_tokens against torch's argmax, act_mul_quant / add_rms_norm
# + e4m3 launches at one row
timeout 60 python3 benchmarks/small_kernels_bench.py $R/small_b1.json --ms 1 > $R/small_b1.log 2>&1
cat $R/small_b1.log; pack
