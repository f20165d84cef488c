#!/usr/bin/env bash
# 29th session, call 1 (one H200): the GPU tests of three untested pieces at once (decode
# splits combined in the decode kernel, KILN_DECODE_FUSED_REDUCE; fp8_swap's epilogue
# through _fp8_epilogue, re-applied; the swapped bf16 GEMV with RMSNorm / SiLU*mul in its
# prologue, kiln.kernels.gemv_swap), then the swapped bf16 GEMV against cuBLAS (alone and
# with the kernel before it), then batch 1 with the fused reduce on / off (bf16, FP8).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
P="python3 -m pytest -q -m gpu -p no:cacheprovider -rf"
timeout 170 $P tests/test_kernels_gpu.py -k decode > $R/tests-decode.log 2>&1 &
timeout 170 $P tests/test_kernels_fp8.py -k "swap or triton or dispatch" > $R/tests-fp8.log 2>&1 &
timeout 170 $P tests/test_gemv_swap.py > $R/tests-gemv-swap.log 2>&1 &
wait; tail -n 2 $R/tests-*.log; pack
timeout 230 python3 benchmarks/gemv_swap_bench.py $R/gemv_swap.json --grid --budget 150 \
  > $R/gemv_swap.log 2>&1; grep -v "^   " $R/gemv_swap.log; pack
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
