#!/usr/bin/env bash
# The 44th session's new defaults on one H200 (~4 minutes): prompts over FP8 / int8 KV caches
# through cuDNN with V gathered from its transposed blocks (KILN_PREFILL_SDPA_VT, on by
# default now) and 1024-token chunks over long caches through SDPA (chunk_pays): the GPU
# engine tests that build 1-byte caches or run prompts through SDPA, the kernels' SDPA test,
# then FP8 + FP8 KV lone-prompt TTFT at 8k / 32k (the 44th's call 4: 163.8 / 940.7 ms with
# it on). Carry .whl (gguf) with it.
set -u
if [ -d .whl ] && ! python3 -c "import gguf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
export KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py \
  tests/test_kernels_gpu.py -k "fp8 or int8 or sdpa or prefix or chunk or transposed or kv" \
  > $OUT/gpu-tests.log 2>&1
tail -4 $OUT/gpu-tests.log; echo "tests t=$SECONDS"
timeout 100 python3 benchmarks/ttft.py --random-config llama-3.1-8b --load-format dummy \
  --quantization fp8 --kv-cache-dtype fp8 --max-seq-len 32768 --lengths 8000,32000 \
  --variants 0 --repeats 3 > $OUT/ttft-fp8.log 2>&1
grep TTFT $OUT/ttft-fp8.log; echo "ttft t=$SECONDS"
