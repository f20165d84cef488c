#!/usr/bin/env bash
# 48th session, call 2: end to end, Llama-3.1-8B shape (random weights), 64 requests of
# 512 in / 256 out and batch 1 (128 / 256), in GGUF's layouts made by kiln's RTN
# (int4_wo / int8_wo in groups of 32: Q4_0-Q4_1 / Q8_0), the grouped steps (new default)
# against KILN_INT_GROUPED=step (the launches before), and bf16
set -uo pipefail
OUT=${OUT:-gpu-out}
export STAGE_TIMEOUT=200
S=benchmarks/gpu_suite.sh
bash $S throughput-64 2>&1 | grep -E "===|kiln|out tok" | grep -v "^kiln:"
for q in q4g32 q8g32; do
  bash $S $q:throughput-64 2>&1 | grep -E "===|kiln |Error|error"
  KILN_INT_GROUPED=step RUN_TAG=-step bash $S $q:throughput-64 2>&1 | grep -E "===|kiln |Error|error"
done
bash $S q4g32:latency-b1 q8g32:latency-b1 2>&1 | grep -E "===|kiln |Error|error"
