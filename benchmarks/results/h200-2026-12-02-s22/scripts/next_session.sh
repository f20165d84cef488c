#!/usr/bin/env bash
# For the next device session (one H200), one call of ~3 minutes, from the repository root:
#   bash benchmarks/results/h200-2026-12-02-s22/scripts/next_session.sh
# 1. Whether a decode step's FP8 GEMMs and its decode attention overlap on the card (two
#    streams, two halves of the batch; FP8 and bf16): decides whether nano-batched decode is
#    worth building.
# 2. FP8 128 / 128 on today's act_mul_quant launch (4096-wide slices, 8 warps), two runs.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
timeout 240 python3 benchmarks/overlap_probe.py $R/overlap.json --rows 512 --ctx 1536,256 --formats fp8,bf16 \
  > $R/overlap.log 2>&1; grep -v Warn $R/overlap.log | tail -4; pack
for i in 1 2; do
  OUT=$R RUN_TAG=-$i EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=70 \
    bash benchmarks/gpu_suite.sh fp8:throughput 2>&1 | grep -E "^kiln|decode steps"
  pack
done
