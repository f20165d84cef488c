#!/usr/bin/env bash
# For the next device session (one H200), written in the 41st after its device time ran out.
#   bash next_session.sh a   (one call, ~6 minutes): the GPU suites with the 41st's defaults
#   bash next_session.sh b   (one call, ~2 minutes): where chunks over a cached prefix start
#                            to win through cuDNN (MIN_CHUNK_TOKENS, 2048 from two points)
#   bash next_session.sh c   (one call, ~4 minutes): FP8 KV caches' V, transposed in its
#                            blocks, gathered for cuDNN (KILN_PREFILL_SDPA_VT=1, opt-in)
#   the 38th's a (decode graph routes, FP8 1000 / 1000 pairs) was lost in the 41st (the machine
#   stopped answering): bash ../../h200-2026-12-04-s38/scripts/next_session.sh a
# a: whole prompts and chunks over a cached prefix go through cuDNN by default since the 41st
# (kiln/kernels/attention_sdpa.py); the engine GPU suite ran before that only for its own
# tests. The whole of tests/test_gpu_engine.py and tests/test_kernels_gpu.py.
# b: chunk sizes around the threshold, new tokens over cached: if 1024-1536 win where the
# cache is long, the rule could weigh the cached part (n x (n + 2c)) instead of n alone.
# c: FP8 + FP8 KV engines keep V transposed in their blocks, so their prompts stay on the
# Triton kernel; KILN_PREFILL_SDPA_VT=1 gathers that layout slot by slot. Its GPU test, then
# FP8 lone-prompt TTFT at 8k / 32k off / on. If it wins, make it the default (V_TRANSPOSED
# "1" unless KILN_PREFILL_SDPA_VT=0).
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
if [[ " ${*:-a} " == *" c "* ]]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider \
    "tests/test_kernels_gpu.py::test_prefill_attention_sdpa" > $OUT/vt-tests.log 2>&1
  tail -5 $OUT/vt-tests.log; echo "tests t=$SECONDS"
  for f in 0 1; do
    KILN_PREFILL_SDPA_VT=$f timeout 100 python3 benchmarks/ttft.py --random-config \
      llama-3.1-8b --load-format dummy --quantization fp8 --kv-cache-dtype fp8 \
      --max-seq-len 32768 --lengths 8000,32000 --variants 0 --repeats 3 > $OUT/vt-s$f.log 2>&1
    echo "vt=$f t=$SECONDS"; grep TTFT $OUT/vt-s$f.log
  done
fi
