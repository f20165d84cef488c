#!/usr/bin/env bash
# For the next device session (written in the 47th, not run: no machine started): launch overrides (KILN_INT_TILES) for the GGUF group-16/32 layouts at
# 8 and 64 rows, against the defaults measured in call 2 (data for the next session)
set -uo pipefail
OUT=${OUT:-gpu-out}
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache
nvidia-smi --query-gpu=name --format=csv,noheader
i=0
for cfg in "64,128,4,3,2,0,0,0,0,1,1" "64,128,4,3,1,0,0,0,0,1,1" "64,128,4,3,2,0,0,1,0,0,0" \
           "64,128,4,3,2,0,0,0,1,0,0" "128,128,4,3,2,0,0,1,0,1,0"; do
  i=$((i+1))
  echo "=== KILN_INT_TILES=$cfg"
  KILN_INT_TILES=$cfg timeout 60 python3 benchmarks/head_bench.py "$OUT/tiles$i.json" --rows 8,64 --layers 2>&1 \
    | grep -E "g32|g16|bf16|Error|assert" | tee -a "$OUT/tiles.log" | sed "s/^/[$i] /"
done
