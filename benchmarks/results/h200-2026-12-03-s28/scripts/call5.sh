#!/usr/bin/env bash
# 28th session, call 5 (one H200): second samples of call 4's 32- / 64-row FP8 runs (this
# tree vs ab_old/, the session's start), then where batch 1's time goes now (per-kernel
# tables of `kiln bench latency --profile`): FP8 + FP8 KV and int4 RTN g128, both with
# --quantize-lm-head. Not run in the 28th session (the device time ran out): for the next.
# a: the FP8 GEMM GPU tests (meant for dba91c5, fp8_swap's epilogue as
#    fp8_quant._fp8_epilogue on its transposed sums: reverted untested, re-apply it first
#    with `git revert <the revert>`), m32b, the FP8 profile;
# b: m64b, the int4 profile, then bf16 decode attention at batch 1 with the engine's 8
#    splits (bf16's 64-key tiles leave splits empty at short contexts, as e4m3's 128 did),
#    and int8's (128 keys) the same way.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
Q="--random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 --quantization fp8 \
  --kv-cache-dtype fp8"
run() {  # name, timeout, args...
  local n=$1 t=$2; shift 2
  (cd ab_old && PYTHONPATH=$PWD timeout $t python3 -m kiln.cli "$@" --out $R/$n-old.json \
    > $R/$n-old.log 2>&1)
  timeout $t python3 -m kiln.cli "$@" --out $R/$n-new.json > $R/$n-new.log 2>&1
  echo "$n"; grep -h "^kiln" $R/$n-new.log $R/$n-old.log; pack
}
if [ "${1:-a}" = a ]; then
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_kernels_fp8.py \
  -k "swap or triton or dispatch" > $R/tests-fp8.log 2>&1; tail -n 2 $R/tests-fp8.log; pack
run m32b 90 bench throughput $Q --input-len 128 --output-len 512 --num-requests 64 --max-batch-size 32
T="b1-fp8"; else
run m64b 90 bench throughput $Q --input-len 128 --output-len 512 --num-requests 128 --max-batch-size 64
T="b1-int4"; fi
for t in $T; do
  q="--quantization fp8 --kv-cache-dtype fp8"
  [ $t = b1-int4 ] && q="--quantization int4_wo --group-size 128"
  KILN_PROFILE_CPU=0 timeout 100 python3 -m kiln.cli bench latency --random-config llama-3.1-8b \
    --load-format dummy --max-seq-len 2048 --input-len 128 --output-len 256 $q --quantize-lm-head \
    --profile /tmp/prof-$t --out $R/$t.json > $R/$t.log 2>&1
  grep -E "^kiln" $R/$t.log | head -3
  timeout 60 python3 benchmarks/trace_gaps.py /tmp/prof-$t/trace.json --by-kernel --top 40 \
    --out $R/gaps-$t.json > $R/gaps-$t.log 2>&1
  head -30 $R/gaps-$t.log; pack
done
if [ "${1:-a}" = b ]; then
  SWEEP_SPLITS=8 SWEEP_SHAPES="1x256;1x512;4x384" SWEEP_LAYOUTS=nhd SWEEP_DTYPES=bf16 \
    SWEEP_PREFETCH=0,1 timeout 150 python3 benchmarks/attn_decode_sweep.py $R/bf16_b1.json \
    > $R/bf16_b1.log 2>&1; grep "^B=" $R/bf16_b1.log; pack
  timeout 120 python3 benchmarks/attn_decode_vt.py $R/int8_b1.json --sweep --kv int8 --splits 8 \
    --decode 1x256,1x512,4x384 > $R/int8_b1.log 2>&1; grep "kiln" $R/int8_b1.log; pack
fi
