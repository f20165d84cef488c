#!/usr/bin/env bash
# For the next device session (one H200), written in the 36th after its device time ran out.
#   bash next_session.sh a      (one device call, ~7 minutes)
#   bash next_session.sh b      (one device call, ~5 minutes)
#   bash next_session.sh c      (one device call, ~9 minutes; first if time is short)
# a: where a SmoothQuant 1000 / 1000 decode step's time goes (#10 asks 1.3x bf16; the 36th
# measured 1.26x: 12,775 vs 10,129, decode 20.6 vs 25.2 ms a token, the run's printout 76%
# of its floor). A mid-run decode step: 296 requests at a 1500-token context, int8_sq +
# int8 KV beside FP8 + FP8 KV (#8 asks 19,500 out tok/s; 15,741) and bf16 + bf16 KV, the
# top kernels of 10 steps each (torch.profiler): how much is attention on the 1-byte
# cache, how much the W8A8 GEMMs, how much the small kernels.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if [[ " ${*:-a} " == *" a "* ]]; then
for v in sq8 fp8 bf16; do
  case $v in
    sq8) q="--quantization int8_sq --kv-cache-dtype int8" ;;  # calibrated: weights stored
    fp8) q="--load-format dummy --quantization fp8 --kv-cache-dtype fp8" ;;  # #8's 19,500
    bf16) q="--load-format dummy" ;;
  esac
  timeout 200 python3 -m kiln.cli build --random-weights --config llama-3.1-8b \
    --max-seq-len 2048 --max-batch-size 512 $q -o /tmp/e-$v > $OUT/build-$v.log 2>&1
  tail -n 1 $OUT/build-$v.log
  timeout 150 python3 benchmarks/profile_decode.py /tmp/e-$v --profile-only --profile-batch 296 \
    --context 1500 --kv-fraction 0.75 > $OUT/profile-$v.log 2>&1
  head -n 3 $OUT/profile-$v.log; grep -A 26 "GPU kernel time" $OUT/profile-$v.log | cut -c 1-140
done
fi
# b: the one-launch dp4a GEMV with the scaling inside (KILN_INT8_GEMV_EPILOGUE=1, opt-in,
# written in the 36th after the device time ran out, interpreter-tested bit for bit): its
# GPU tests (kernel, and the int8_sq engines against the CPU engine with it on), then
# SmoothQuant batch 1 with it off / on twice (36th: 266.6 tok/s, 50% of the roofline; 12
# launches a layer for the four linears where bf16 has 4). If it wins, make it the default
# (int8_gemm.int8_linear) and say so in docs/kernels.md and BENCHMARKS.md.
if [[ " ${*:-a} " == *" b "* ]]; then
  timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_kernels_int8_act.py \
    -k "gemv" > $OUT/gemv-tests.log 2>&1; tail -n 2 $OUT/gemv-tests.log
  KILN_INT8_GEMV_EPILOGUE=1 timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf \
    tests/test_weight_only.py -k "int8_sq" > $OUT/gemv-engine-tests.log 2>&1
  tail -n 2 $OUT/gemv-engine-tests.log
  for round in 1 2; do
    for e in 0 1; do
      KILN_INT8_GEMV_EPILOGUE=$e RUN_TAG=-e$e-$round timeout 150 bash benchmarks/gpu_suite.sh \
        sq8:latency-b1 > $OUT/b1-sq8-e$e-$round.log 2>&1
      echo "sq8 b1 epilogue $e round $round: $(grep -h '^kiln ' $OUT/b1-sq8-e$e-$round.log | tail -1)"
    done
  done
  rm -f $OUT/*.png $OUT/*.json
fi
# c: an int8 KV cache's attention products in float16 (KILN_INT8_KV_F16=1, opt-in, written
# in the 36th without a GPU: the tiles converted by prmt + sub.f16x2, 1,682 main-loop
# instructions a 128-key tile against 2,039; e4m3 takes 1,290). The 21st-27th found 1-byte
# decode attention bound on the SM side (int8 V_T at B=512 x 1536 0.454 ms, e4m3 0.403).
# GPU tests with it on (kernels against the reference, the int8_sq engines against the CPU
# engine), the decode / prefill kernels off / on, then int8_sq + int8 KV 1000 / 1000 x 300
# off / on twice (36th: 12,775; #10 asks 1.3x bf16's 10,129 = 13,170). If it wins, make it
# the default (kv_operands.INT8_KV_F16) and say so in docs/kernels.md and BENCHMARKS.md.
if [[ " ${*:-a} " == *" c "* ]]; then
  KILN_INT8_KV_F16=1 timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf \
    tests/test_kernels_kvquant.py > $OUT/kvf16-tests.log 2>&1; tail -n 2 $OUT/kvf16-tests.log
  KILN_INT8_KV_F16=1 timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf \
    tests/test_weight_only.py tests/test_gpu_engine.py -k "int8" > $OUT/kvf16-engine.log 2>&1
  tail -n 2 $OUT/kvf16-engine.log
  for f in 0 1; do
    KILN_INT8_KV_F16=$f timeout 120 python3 benchmarks/attn_decode_vt.py $OUT/attn-f$f.json \
      --kv int8 --decode 512x1536,296x1500,256x1024,64x8192 --prefill 1x8192 \
      > $OUT/attn-f$f.log 2>&1; echo "KILN_INT8_KV_F16=$f"; cat $OUT/attn-f$f.log | cut -c 1-110
  done
  for round in 1 2; do
    for f in 0 1; do
      [ $SECONDS -gt 420 ] && break 2
      KILN_INT8_KV_F16=$f timeout 200 python3 -m kiln.cli bench throughput \
        --random-config llama-3.1-8b --input-len 1000 --output-len 1000 --num-requests 300 \
        --max-seq-len 2048 --quantization int8_sq --kv-cache-dtype int8 \
        --out $OUT/r$round-f$f.json > $OUT/r$round-f$f.log 2>&1
      echo "round $round KILN_INT8_KV_F16=$f $(grep -h '^kiln ' $OUT/r$round-f$f.log | tail -1) t=$SECONDS"
    done
  done
  rm -f $OUT/*.png $OUT/*.json
fi
