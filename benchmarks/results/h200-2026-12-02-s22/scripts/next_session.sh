#!/usr/bin/env bash
# For the next device session (one H200), from the repository root:
#   bash benchmarks/results/h200-2026-12-02-s22/scripts/next_session.sh a   (~6 minutes)
#   bash benchmarks/results/h200-2026-12-02-s22/scripts/next_session.sh b   (~7 minutes)
# a: GPU tests of the nano-batched decode steps; whether a decode step's GEMMs and its decode
#    attention overlap on the card at all (benchmarks/overlap_probe.py: FP8 and bf16, two
#    halves of the batch on two streams); decode attention with 32-key tiles at short
#    contexts; FP8 128 / 128 on today's act_mul_quant launch.
# b: end to end, KILN_NANO_BATCH=128 (decode graphs of 128+ rows in halves) against off,
#    alternating: FP8 1000 / 1000 (512 requests), bf16 1000 / 1000 (300), FP8 128 / 128.
# c: mixed steps' leading decode rows on the decode kernel (KILN_MIXED_DECODE_ROWS=1) vs off.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
run() {  # run TAG NANO STAGE [NUM_REQUESTS]
  KILN_NANO_BATCH=$2 NUM_REQUESTS=${4:-1000} OUT=$R RUN_TAG=$1 EXTRA_ARGS="--load-format dummy" \
    STAGE_TIMEOUT=120 bash benchmarks/gpu_suite.sh $3 2>&1 | grep -E "^kiln|decode steps"
  pack
}
case ${1:-a} in
  a)
    KILN_MIXED_DECODE_ROWS=1 timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
      tests/test_gpu_engine.py tests/test_kernels_kvquant.py \
      -k "nano_batch or mixed or steps_after_load or graphs_and_overlap" > $R/tests.log 2>&1
    tail -3 $R/tests.log; pack
    timeout 240 python3 benchmarks/overlap_probe.py $R/overlap.json --rows 512 \
      --ctx 1536,256 --formats fp8,bf16 > $R/overlap.log 2>&1
    grep -v Warn $R/overlap.log | tail -4; pack
    # 32-key tiles at 128 / 128's contexts (fewer registers, more tiles a program)
    SWEEP_SHAPES="496x192;496x256;512x1536" SWEEP_LAYOUTS=nhd SWEEP_DTYPES=bf16,fp8 \
      SWEEP_CONFIGS="64,3,2;32,3,2;32,4,2;32,3,4;64,2,4" timeout 120 \
      python3 benchmarks/attn_decode_sweep.py $R/attn_n32.json > $R/attn_n32.log 2>&1
    grep "^B=" $R/attn_n32.log; pack
    run -act1 0 fp8:throughput; run -act2 0 fp8:throughput ;;
  b)
    for i in 1 2; do
      run -nano0-$i 0 fp8:throughput-1k 512; run -nano128-$i 128 fp8:throughput-1k 512
    done
    run -nano0 0 throughput-1k 300; run -nano128 128 throughput-1k 300
    run -nano0 0 fp8:throughput; run -nano128 128 fp8:throughput ;;
  c)  # mixed steps' leading decode rows on the decode kernel (opt-in) against off
    for i in 1 2; do
      KILN_MIXED_DECODE_ROWS=1 run -mixed1-$i 0 fp8:throughput-1k 512
      KILN_MIXED_DECODE_ROWS=0 run -mixed0-$i 0 fp8:throughput-1k 512
    done
    KILN_MIXED_DECODE_ROWS=1 run -mixed1 0 throughput-1k 300
    KILN_MIXED_DECODE_ROWS=0 run -mixed0 0 throughput-1k 300 ;;
esac
