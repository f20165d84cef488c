#!/usr/bin/env bash
# 29th session, call 2 (one H200): decode splits combined in the decode kernel
# (KILN_DECODE_FUSED_REDUCE=1, opt-in) and fp8_swap's epilogue through _fp8_epilogue
# (re-applied dba91c5): their GPU tests, the engine tests with the fused reduce on, then
# batch 1 with it on / off (bf16; FP8 + FP8 KV with the head quantized), alternating.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
P="python3 -m pytest -q -m gpu -p no:cacheprovider -rf"
timeout 150 $P tests/test_kernels_gpu.py -k decode > $R/tests-decode.log 2>&1 &
timeout 150 $P tests/test_kernels_fp8.py -k "swap or triton or dispatch" > $R/tests-fp8.log 2>&1 &
KILN_DECODE_FUSED_REDUCE=1 timeout 200 $P tests/test_gpu_engine.py -k "fp8 or v_transposed" \
  > $R/tests-fused-engine.log 2>&1 &
wait; tail -n 2 $R/tests-*.log; pack
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
  --input-len 128 --output-len 256"
for q in "" "--quantization fp8 --kv-cache-dtype fp8 --quantize-lm-head"; do
  t=b1${q:+-fp8}
  for f in 1 0; do
    KILN_DECODE_FUSED_REDUCE=$f timeout 75 python3 -m kiln.cli $B $q --out $R/$t-f$f.json \
      > $R/$t-f$f.log 2>&1
    echo "$t fused=$f"; grep -h "^kiln" $R/$t-f$f.log; pack
  done
done
