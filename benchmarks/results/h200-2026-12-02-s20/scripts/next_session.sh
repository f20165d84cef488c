#!/usr/bin/env bash
# The twentieth session's untimed work, for the next device session (one H200), in two
# calls of under 10 minutes each. From the repository root:
#   run: bash benchmarks/results/h200-2026-12-02-s20/scripts/next_session.sh a   (tests, sweep)
#   run: bash benchmarks/results/h200-2026-12-02-s20/scripts/next_session.sh b   (A/B runs)
# Results under $OUT/r, packed into $OUT/r.tgz after every step.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
case ${1:-a} in
  a)
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
      tests/test_bench_roofline.py tests/test_kernels_kvquant.py tests/test_gpu_engine.py \
      -k "gemm_rate or register_cap or fp8_engine_on_gpu" > $R/tests.log 2>&1
    tail -3 $R/tests.log; pack
    SWEEP_MAXNREG=0,168,128 SWEEP_CONFIGS="64,2,2;128,2,2;64,2,4" OUT=$R STAGE_TIMEOUT=240 \
      bash benchmarks/gpu_suite.sh attn-decode-sweep 2>&1 | tail -20; pack ;;
  b)
    for i in 1 2; do  # FP8 batch 1: the head in bf16 / int8 / e4m3, alternating
      for head in none int8_wo auto; do
        extra="--load-format dummy"; [ $head != none ] && extra="$extra --quantize-lm-head $head"
        OUT=$R RUN_TAG=-head-$head-$i EXTRA_ARGS="$extra" STAGE_TIMEOUT=90 \
          bash benchmarks/gpu_suite.sh fp8:latency-b1 2>&1 | grep -E "^kiln|HBM"; pack
      done
    done
    for i in 1 2; do  # FP8 1000/1000 (512 requests): decode attention's register cap
      for cap in "" 168; do
        KILN_KV8_DECODE_MAXNREG=$cap OUT=$R RUN_TAG=-cap${cap:-none}-$i NUM_REQUESTS=512 \
          EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=90 \
          bash benchmarks/gpu_suite.sh fp8:throughput-1k 2>&1 | grep -E "^kiln|decode steps|floor"
        pack
      done
    done ;;
esac
