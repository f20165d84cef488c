#!/usr/bin/env bash
# Call 3: programmatic dependent launch of the small kernels (KILN_PDL=1) at batch 1, bf16
# and FP8, alternating with it off; the engine's GPU token tests with it on.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
for q in "" fp8:; do
  for p in 1 0; do
    KILN_PDL=$p OUT=$R RUN_TAG=-pdl$p EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=80 \
      bash benchmarks/gpu_suite.sh ${q}latency-b1 2>&1 | grep -A1 "^engine" | tail -1
    pack
  done
done
KILN_PDL=1 timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_gpu_engine.py \
  -k "graphs_and_overlap or fp8_engine_on_gpu or prefill_graphs" > $R/tests-pdl.log 2>&1
tail -3 $R/tests-pdl.log; pack
