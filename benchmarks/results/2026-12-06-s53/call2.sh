#!/usr/bin/env bash
# 53rd session, call 2:
# 1. why 16 rows are slow (o 33.1 us at 16 rows against 12.9 at 8, down 48.5 against 27.9):
#    programs an SM holds per rows a program and stages (probe_occ.py), then the launches
#    around the default at 12 and 16 rows (--sweep)
# 2. the Gluon int4 kernel at 5-8 rows end to end (8 requests of 128 in / 256 out: decode
#    at 8 rows), the default (33-64) against 5-8,33-64, alternating, bf16 too
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 benchmarks/results/2026-12-06-s53/probe_occ.py > "$OUT/occ.log" 2>&1
tail -40 "$OUT/occ.log"
timeout 150 python3 benchmarks/int_wgmma_bench.py "$OUT/sweep16.json" --rows 12,16 --groups 128 \
  --sweep > "$OUT/sweep16.log" 2>&1; grep -E "^(o|down) " "$OUT/sweep16.log"
run() {  # run TAG KILN_INT_WGMMA SPEC
  KILN_INT_WGMMA=$2 NUM_REQUESTS=8 RUN_TAG=-$1 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=150 \
    bash benchmarks/gpu_suite.sh $3 2>&1 | grep -E "kiln |rror" | sed "s/^/[$1] /" \
    | tee -a "$OUT/e2e.log"
}
run warm 5-8,33-64 int4:throughput-few  # (compiles: not counted)
for i in 1 2; do
  run w58-$i 5-8,33-64 int4:throughput-few; run def-$i "" int4:throughput-few
  run bf16-$i "" throughput-few
done
