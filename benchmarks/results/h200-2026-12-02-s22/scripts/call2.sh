#!/usr/bin/env bash
# Call 2: the L2 prefetch's budget at batch 1 (bf16; 1 MB = the side-stream fork and join
# with almost nothing prefetched), then act_mul_quant in slices (this tree) vs one tile
# (ab_old/, see the s21 next_session.sh) on FP8 128 / 128, alternating.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
for mb in 0 1 8; do
  KILN_L2_PREFETCH_MB=$mb OUT=$R RUN_TAG=-pf$mb EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=80 \
    bash benchmarks/gpu_suite.sh latency-b1 2>&1 | grep -A1 "^engine" | tail -1
  pack
done
for i in 1 2; do
  OUT=$R RUN_TAG=-act-new-$i EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=70 \
    bash benchmarks/gpu_suite.sh fp8:throughput 2>&1 | grep -E "^kiln|decode steps"
  (cd ab_old && OUT=$R RUN_TAG=-act-old-$i EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=70 \
    PYTHONPATH=$PWD bash benchmarks/gpu_suite.sh fp8:throughput 2>&1 | grep -E "^kiln|decode steps")
  pack
done
