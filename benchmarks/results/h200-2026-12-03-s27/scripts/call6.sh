#!/usr/bin/env bash
# 27th session, call 6: the swapped FP8 GEMM at 17-64 tokens (token tiles of 32 / 64)
# against the current 64-row wgmma tile, M = 32 and 64, a run per shape.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
for nk in 4096:4096 6144:4096 4096:14336 28672:4096; do
  timeout 110 python3 benchmarks/fp8_gemm.py --grid --swap --ms 32,64 --shapes $nk \
    --out $R/grid64_${nk/:/x}.json > $R/grid64_${nk/:/x}.log 2>&1
  grep "M=" $R/grid64_${nk/:/x}.log; pack
done
