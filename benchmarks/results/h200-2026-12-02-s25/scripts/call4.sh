#!/usr/bin/env bash
# 25th session, call 4: GPU tests of the session's changes (the decode launch on the
# transposed 1-byte layout: 128-key tiles; the TMA engine test) and two the 24th-session
# suite's group a did not reach (its stage timed out at 83%); then end to end: FP8 + FP8
# KV with the new decode launch, bf16 on 64-token blocks with TMA prefill tiles (against
# this session's call-2 bf16 numbers on 16-token blocks), lone-prompt TTFT the same way.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
P="python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short --durations=8"
timeout 170 $P tests/test_gpu_engine.py tests/test_bench_roofline.py \
  -k "mixed_steps or tma_prefill or v_transposed or fp8_engine_on_gpu or gemm_rate" \
  > $R/tests-engine.log 2>&1 &
timeout 170 $P tests/test_kernels_kvquant.py -k "decode or transposed" > $R/tests-kv.log 2>&1 &
wait
tail -n 16 $R/tests-engine.log; tail -n 4 $R/tests-kv.log; pack
run() {  # run TAG STAGE NUM_REQUESTS [EXTRA]
  NUM_REQUESTS=$3 OUT=$R RUN_TAG=$1 EXTRA_ARGS="--load-format dummy ${4:-}" \
    STAGE_TIMEOUT=110 bash benchmarks/gpu_suite.sh $2 2>&1 \
    | grep -E "^kiln|decode steps|prompt steps|Triton compiled|rror"
  pack
}
run -vt128 fp8:throughput 1000
KILN_PREFILL_TMA=1 run -bs64tma throughput 1000 "--block-size 64"
KILN_PREFILL_TMA=1 run -bs64tma throughput-1k 300 "--block-size 64"
run -vt128 fp8:throughput-1k 512
for v in "16 0" "64 1"; do set -- $v
  KILN_PREFILL_TMA=$2 timeout 75 python3 benchmarks/ttft.py --random-config llama-3.1-8b \
    --load-format dummy --max-seq-len 32768 --max-num-tokens 32768 --block-size $1 \
    --lengths 8000,32000 --variants 0 --repeats 3 --out $R/ttft-bs$1.json > $R/ttft-bs$1.log 2>&1
  tail -3 $R/ttft-bs$1.log; pack
done
