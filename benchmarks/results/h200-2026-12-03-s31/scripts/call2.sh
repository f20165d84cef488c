#!/usr/bin/env bash
# 31st session, call 2: the rotary epilogue's roundings against a torch emulation, then the
# whole GPU suite on the new defaults (GLU + rotary epilogues, attention and INT4 PDL).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
timeout 60 python3 benchmarks/results/h200-2026-12-03-s31/scripts/rope_diag.py > $OUT/rope_diag.log 2>&1; cat $OUT/rope_diag.log | tail -8
STAGE_TIMEOUT=440 bash benchmarks/gpu_suite.sh tests 2>&1 | tail -40
