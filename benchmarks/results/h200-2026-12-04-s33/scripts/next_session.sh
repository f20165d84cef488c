#!/usr/bin/env bash
# For the next device session (one H200, ~360 s), written in the 33rd after its device time
# ran out. The warm-up's full-width decode steps (kiln.runtime.warmup.full_width_decode_steps,
# written after call 4 showed a cold 32k load spending 29.7 s in the graph capture against
# 3.4 with the 64-key tiles): their GPU test, then a cold 32k load (empty Triton cache) and
# its batch-1 decode (85.2-85.4% of the roofline in the 33rd), then a warm one.
#   bash next_session.sh a|b|c     (one device call each: a ~6, b ~5, c ~7 minutes)
# b and c were added in the 34th session, which had no device time: the fused W8A8 GEMM
# (kernels/int8_gemm.py, KILN_INT8_GEMM=triton). b: its GPU test, its tiles against
# _int_mm + epilogue / bf16 / FP8 at 4-4096 rows; c: SmoothQuant + int8 KV 1000 / 1000 x 300
# with and without it and bf16 beside them (issue #10's 1.3x; 1.07x in the 30th).
set -u
parts=${*:-a}
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if [[ " $parts " == *" a "* ]]; then
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_gpu_engine.py \
  -k "long_engine or compile_nothing" > $OUT/tests.log 2>&1; tail -n 3 $OUT/tests.log
L="bench latency --random-config llama-3.1-8b --load-format dummy --input-len 32000 --output-len 128 --max-seq-len 32768"
for run in cold warm; do
  [ $run = cold ] && export TRITON_CACHE_DIR=/tmp/tc-cold-$$
  timeout 120 python3 -m kiln.cli $L --out $OUT/long-$run.json > $OUT/long-$run.log 2>&1
  echo "32k batch 1, $run Triton cache"; grep -h "engine loaded\|^kiln\|HBM" $OUT/long-$run.log
done
# the attention sweep now timed in CUDA graphs (33rd: do_bench timed short launches by their
# Python launch): the 33rd's shapes again, 64- against 128-key tiles (~60 s)
export SWEEP_DTYPES=bf16 SWEEP_LAYOUTS=nhd SWEEP_CONFIGS="64,2,4;128,3,4;128,2,4"
for run in "32 1x32000;1x16000;1x8000" "8 8x4000;8x8000"; do
  sp=${run%% *}; SWEEP_SPLITS=$sp SWEEP_SHAPES="${run#* }" timeout 120 python3 \
    benchmarks/attn_decode_sweep.py $OUT/sweep-s$sp.json > $OUT/sweep-s$sp.log 2>&1
  echo "splits $sp"; grep "B=" $OUT/sweep-s$sp.log
done
fi
if [[ " $parts " == *" b "* ]]; then
  unset TRITON_CACHE_DIR
  timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_kernels_int8_act.py \
    > $OUT/int8-tests.log 2>&1; tail -n 3 $OUT/int8-tests.log
  timeout 240 python3 benchmarks/int8_gemm_bench.py $OUT/int8_gemm.json --rows 4,16,64,256,512,1024,4096 \
    > $OUT/int8_gemm.log 2>&1; grep "layer\|MISMATCH" $OUT/int8_gemm.log
fi
if [[ " $parts " == *" c "* ]]; then
  for v in default triton bf16; do
    case $v in
      default) env=""; q="--quantization int8_sq --kv-cache-dtype int8" ;;
      triton) env="KILN_INT8_GEMM=triton"; q="--quantization int8_sq --kv-cache-dtype int8" ;;
      bf16) env=""; q="--load-format dummy" ;;  # (the 30th's call 4: sq8 built and calibrated, ~200 s)
    esac
    env $env timeout 240 python3 -m kiln.cli bench throughput --random-config llama-3.1-8b \
      --input-len 1000 --output-len 1000 --num-requests 300 --max-seq-len 2048 $q \
      --out $OUT/sq8-1k-$v.json > $OUT/sq8-1k-$v.log 2>&1
    echo "1000/1000 x 300, $v"; grep -h "out tok/s\|output tok" $OUT/sq8-1k-$v.log | tail -2
  done
fi
