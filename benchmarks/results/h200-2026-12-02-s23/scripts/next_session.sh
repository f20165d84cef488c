#!/usr/bin/env bash
# For the next device session (one H200), from the repository root:
#   bash benchmarks/results/h200-2026-12-02-s23/scripts/next_session.sh a   (~5 minutes)
#   bash benchmarks/results/h200-2026-12-02-s23/scripts/next_session.sh b   (~7 minutes)
#   bash benchmarks/results/h200-2026-12-02-s23/scripts/next_session.sh c   (~5 minutes)
# a: GPU tests of the V-transposed 1-byte caches (KILN_KV_V_TRANSPOSED=1, opt-in: bit-equal
#    logits and tokens; the e4m3 / int8 kernel tests); benchmarks/attn_decode_vt.py (kiln's decode
#    and prefill kernels on both layouts: the decode main loop compiles to 718 instructions
#    a 64-key tile instead of 1,179); the TMA prefill probe (can a Triton 3.6 kernel over
#    contiguous K / V reach SDPA at 1k / 4k / 8k tokens? issue #12).
# b: end to end, KILN_KV_V_TRANSPOSED=1 against 0, alternating: FP8 1000 / 1000 (512
#    requests) twice, FP8 128 / 128 (1000 requests).
# c: the same for SmoothQuant W8A8 with an int8 KV cache, 1000 / 1000 (300 requests), twice.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
run() {  # run TAG V_T STAGE [NUM_REQUESTS]
  KILN_KV_V_TRANSPOSED=$2 NUM_REQUESTS=${4:-1000} OUT=$R RUN_TAG=$1 \
    EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=120 bash benchmarks/gpu_suite.sh $3 2>&1 \
    | grep -E "^kiln|decode steps"
  pack
}
case ${1:-a} in
  a)
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
      tests/test_gpu_engine.py tests/test_kernels_kvquant.py -k "v_transposed or fp8 or e4m3" \
      > $R/tests.log 2>&1
    tail -3 $R/tests.log; pack
    timeout 150 python3 benchmarks/attn_decode_vt.py $R/attn_vt.json > $R/attn_vt.log 2>&1
    grep -v Warn $R/attn_vt.log | tail -20; pack
    timeout 150 python3 benchmarks/attn_prefill_tma.py $R/attn_tma.json \
      --lengths 1024,4096,8192 > $R/attn_tma.log 2>&1
    grep -v Warn $R/attn_tma.log | tail -30; pack ;;
  b)
    for i in 1 2; do
      run -vt1-$i 1 fp8:throughput-1k 512; run -vt0-$i 0 fp8:throughput-1k 512
    done
    run -vt1 1 fp8:throughput; run -vt0 0 fp8:throughput ;;
  c)
    for i in 1 2; do
      run -vt1-$i 1 sq8:throughput-1k 300; run -vt0-$i 0 sq8:throughput-1k 300
    done ;;
esac
