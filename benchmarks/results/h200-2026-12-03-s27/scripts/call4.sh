#!/usr/bin/env bash
# 27th session, call 4: the swapped FP8 grid widened (64-key steps, 10-12 stages), a run per shape.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
for nk in 4096:4096 6144:4096 4096:14336 28672:4096; do
  timeout 130 python3 benchmarks/fp8_gemm.py --grid --swap --ms 1,16 --shapes $nk \
    --out $R/grid2_$nk.json > $R/grid2_$nk.log 2>&1
  grep "M=" $R/grid2_$nk.log; pack
done
