#!/usr/bin/env bash
# For the next device session (one H200), written in the 41st after its device time ran out.
#   bash next_session.sh a   (one call, ~6 minutes): the GPU suites with the 41st's defaults
#   bash next_session.sh b   (one call, ~2 minutes): where chunks over a cached prefix start
#                            to win through cuDNN (MIN_CHUNK_TOKENS, 2048 from two points)
#   the 38th's a (decode graph routes, FP8 1000 / 1000 pairs) was lost in the 41st (the machine
#   stopped answering): bash ../../h200-2026-12-04-s38/scripts/next_session.sh a
# a: whole prompts and chunks over a cached prefix go through cuDNN by default since the 41st
# (kiln/kernels/attention_sdpa.py); the engine GPU suite ran before that only for its own
# tests. The whole of tests/test_gpu_engine.py and tests/test_kernels_gpu.py.
# b: chunk sizes around the threshold, new tokens over cached: if 1024-1536 win where the
# cache is long, the rule could weigh the cached part (n x (n + 2c)) instead of n alone.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if [[ " ${*:-a} " == *" a "* ]]; then
  timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py \
    tests/test_kernels_gpu.py > $OUT/gpu-tests.log 2>&1
  tail -15 $OUT/gpu-tests.log; echo "tests t=$SECONDS"
fi
if [[ " ${*:-a} " == *" b "* ]]; then
  timeout 120 python3 benchmarks/attn_prefill_sdpa.py $OUT/attn-chunks.json --cases \
    1024@1000,1024@8000,1024@24000,1536@3000,1536@12000,2048@2000,2048@16000,4096@4096 2>&1 \
    | grep -v "Warning\|return F" > $OUT/attn.log
  grep "kiln" $OUT/attn.log | grep -v "x of"; echo "bench t=$SECONDS"
fi
