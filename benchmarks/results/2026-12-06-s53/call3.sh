#!/usr/bin/env bash
# 53rd session, call 3: one wave of programs at 9-32 rows (split halved): per linear at
# 12-32 rows, then int4 16 x 128 / 256 end to end with the kernel at 5-64 rows against
# 5-8,33-64, alternating, bf16 once; the occupancy probe last
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 benchmarks/int_wgmma_bench.py "$OUT/rows.json" --rows 12,16,24,32 \
  > "$OUT/rows.log" 2>&1; grep -A12 "^a layer" "$OUT/rows.log"
run() {  # run TAG KILN_INT_WGMMA SPEC
  KILN_INT_WGMMA=$2 NUM_REQUESTS=16 RUN_TAG=-$1 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=150 \
    bash benchmarks/gpu_suite.sh $3 2>&1 | grep -E "kiln |rror" | sed "s/^/[$1] /" \
    | tee -a "$OUT/e2e.log"
}
run warm 1 int4:throughput-few  # (compiles: not counted)
for i in 1 2; do run all-$i 1 int4:throughput-few; run two-$i 5-8,33-64 int4:throughput-few; done
run bf16 "" throughput-few
rm -f "$OUT"/*.png
timeout 60 python3 benchmarks/results/2026-12-06-s53/probe_occ.py > "$OUT/occ.log" 2>&1
tail -40 "$OUT/occ.log"
