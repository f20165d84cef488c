#!/usr/bin/env bash
# For the next device session (written in the 49th after its device time ran out).
# Before the call, on the CPU machine (untracked, so the device copy carries it; delete after):
#   mkdir ab_old && git archive 625904e kiln | tar -x -C ab_old   # the tree before GGUF PDL
# Carry .whl (gguf wheel: the GGUF tests and the SmolLM2 file need it).
# 1. GPU tests of what the 49th changed (INT4 GEMV preload, GGUF engines on the GPU)
# 2. SmolLM2's Q4_1 GGUF kept on the GPU, batch 1, the small kernels PDL-launched (now)
#    against the tree before (ab_old), alternating twice
# 3. KILN_INT_EVEN=1 (mask-free whole tiles) against the default on cold weights, twice
# 4. INT4 g128 batch 1 with the preload (on an H200 this updates #10's 402.9)
set -uo pipefail
OUT=${OUT:-gpu-out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONPATH=$PWD:$PWD/benchmarks:$PYTHONPATH KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_int_pairs.py \
  tests/test_gguf_kept.py tests/test_gemv_swap_epilogues.py -k "gpu or pdl" 2>&1 | tail -3
for i in 1 2; do
  timeout 120 python3 -m kiln.cli bench latency --input-len 128 --output-len 256 \
    --out "$OUT/smol-new-$i.json" 2>&1 | grep -E "^kiln " | sed "s/^/[smol new] /"
  (cd ab_old && PYTHONPATH=$PWD:/tmp/site timeout 120 python3 -m kiln.cli bench latency \
    --input-len 128 --output-len 256 --out "$OUT/smol-old-$i.json" 2>&1 | grep -E "^kiln " \
    | sed "s/^/[smol old] /")
done
for i in 1 2; do
  for even in 0 1; do
    KILN_INT_EVEN=$even timeout 150 python3 benchmarks/head_bench.py "$OUT/even$even-$i.json" \
      --rows 8,64 --layers --cold --only g32,g16 > "$OUT/even$even-$i.log" 2>&1
    grep -E "^layer|Error" "$OUT/even$even-$i.log" | sed "s/^/[even=$even] /"
  done
done
EXTRA_ARGS="--quantize-lm-head" STAGE_TIMEOUT=150 bash benchmarks/gpu_suite.sh int4:latency-b1 \
  2>&1 | grep -E "===|kiln "
