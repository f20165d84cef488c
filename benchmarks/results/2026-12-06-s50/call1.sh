#!/usr/bin/env bash
# For the next device session (written in the 49th after its device time ran out), call a
# of two (next_call_b.sh: the INT8 GEMV's PDL, the mask-free tiles, INT4 batch 1).
# Carry .whl (the gguf wheel: benchmarks/random_gguf.py and the GGUF tests need it).
# 1. GPU tests of what the 49th changed (INT4 GEMV preload; GGUF engines on the GPU)
# 2. KILN_GGUF_PDL=1 (the small decode kernels PDL-launched in GGUF engines whose every
#    layer is a Q4 block) against the default, batch 1 on random Q4_1 files of SmolLM2's
#    and Llama-3.1-8B's shapes (benchmarks/random_gguf.py), alternating twice
set -uo pipefail
OUT=${OUT:-gpu-out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONPATH=$PWD:$PWD/benchmarks:$PYTHONPATH KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_int_pairs.py \
  tests/test_gguf_kept.py tests/test_gemv_swap_epilogues.py tests/test_int_gemv1_pdl.py \
  -k "gpu or pdl" 2>&1 | tail -3
timeout 60 python3 benchmarks/random_gguf.py /tmp/smol-q4_1.gguf --config smollm2-135m --head tied
timeout 200 python3 benchmarks/random_gguf.py /tmp/l8b-q4_1.gguf --config llama-3.1-8b --embed Q4_1
for f in smol l8b; do
  for i in 1 2; do
    for on in 0 1; do
      KILN_GGUF_PDL=$on timeout 300 python3 -m kiln.cli bench latency /tmp/$f-q4_1.gguf \
        --input-len 128 --output-len 256 --max-seq-len 2048 --out "$OUT/gguf-$f-pdl$on-$i.json" \
        2>&1 | grep -E "^kiln |rror" | sed "s/^/[$f pdl=$on] /"
    done
  done
done
