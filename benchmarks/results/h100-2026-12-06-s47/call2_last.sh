#!/usr/bin/env bash
# 47th session, call 2: the LM head in integer layouts against bf16 (should CUDA builds
# keep a GGUF file's Q8_0 head, as CPU builds do?)
set -uo pipefail
OUT=${OUT:-gpu-out}
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache
nvidia-smi --query-gpu=name --format=csv,noheader
KILN_INT_SWAP=1 timeout 300 python3 benchmarks/head_bench.py "$OUT/layers_bench_swap.json" --rows 8,64 --layers 2>&1 | tee "$OUT/layers_bench_swap.log" | grep -v "int4 g128|per channel" | tail -40
