#!/usr/bin/env bash
# 29th session, call 4 (one H200; calls 2 and 3 merged after two refused starts): the GPU
# tests of the swapped bf16 GEMV (kiln.kernels.gemv_swap, KILN_BF16_SWAP=1), of decode
# splits combined in the decode kernel (KILN_DECODE_FUSED_REDUCE=1) and of fp8_swap's
# epilogue through _fp8_epilogue, all at once; the swapped GEMV against cuBLAS; then batch 1
# end to end: bf16 off / swap / swap + fused reduce, FP8 + FP8 KV (head quantized) with
# the fused reduce on / off, alternating.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
P="python3 -m pytest -q -m gpu -p no:cacheprovider -rf"
timeout 170 $P tests/test_gemv_swap.py > $R/tests-gemv-swap.log 2>&1 &
timeout 170 $P tests/test_kernels_gpu.py -k decode > $R/tests-decode.log 2>&1 &
timeout 170 $P tests/test_kernels_fp8.py -k "swap or triton or dispatch" > $R/tests-fp8.log 2>&1 &
KILN_DECODE_FUSED_REDUCE=1 timeout 170 $P tests/test_gpu_engine.py -k "fp8 or v_transposed" \
  > $R/tests-fused-engine.log 2>&1 &
wait; tail -n 2 $R/tests-*.log; pack
timeout 100 python3 benchmarks/gemv_swap_bench.py $R/gemv_swap.json > $R/gemv_swap.log 2>&1
grep -v "^   " $R/gemv_swap.log; pack
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
  --input-len 128 --output-len 256"
F="--quantization fp8 --kv-cache-dtype fp8 --quantize-lm-head"
one() {  # name, swap, fused, args...
  local n=$1 s=$2 f=$3; shift 3
  KILN_BF16_SWAP=$s KILN_DECODE_FUSED_REDUCE=$f timeout 60 python3 -m kiln.cli $B "$@" \
    --out $R/$n.json > $R/$n.log 2>&1; echo "$n"; grep -h "^kiln" $R/$n.log; pack
}
for i in 1 2; do
  one b1-s1f0-$i 1 0; one b1-s0f0-$i 0 0; one b1-s1f1-$i 1 1
done
one b1-fp8-f1 0 1 $F; one b1-fp8-f0 0 0 $F
