#!/usr/bin/env bash
# The 62nd session's device calls (carry .whl: `pip download --no-deps -d .whl gguf`).
#  a (~3 min): e4m3 decode attention with e4m3 products (benchmarks/attn_decode_fp8mma.py):
#     its GPU check against its rounding emulated, then timings against kiln's kernel
#  p / f / h: the 60th session's call.sh stages (int4 TMA GEMV PDL modes, profiles, H200)
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/0card.log"
for stage in "$@"; do case $stage in
a) timeout 150 python3 benchmarks/attn_decode_fp8mma.py check > "$OUT/a1check.log" 2>&1
   tail -2 "$OUT/a1check.log"
   timeout 300 python3 benchmarks/attn_decode_fp8mma.py bench "$OUT/a2bench.json" \
     > "$OUT/a2bench.log" 2>&1
   grep -A30 "^best" "$OUT/a2bench.log" | cut -c1-120 ;;
*) OUT=$OUT bash benchmarks/results/2026-12-07-s60/call.sh "$stage" ;;
esac; done
