#!/usr/bin/env bash
# For the next device session, on an H200 if one is lent (`run` with kind nvidia-h200), so
# #10's batch-64 row compares with the 32nd session's 0.83x (two calls: `bash next_call.sh a`, then `b`):
# 0. the kernel's GPU tests (split_bars: a barrier a copy, untested on a GPU)
# 1. the Gluon kernel against the Triton tiles per linear at 8-64 rows (groups of 128 and
#    32), with split_bars too: should the default (33-64 rows) reach down to 5?
# 2. int4 64 x 512 / 256 end to end, the kernel on (the default) and off, alternating, bf16
#    in the same call, and split_bars end to end; then the GGUF Q4 layout on and off.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
PART=${1:-a}  # a: 0 and 1 (~4 minutes); b: 2 (~8 minutes)
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "$PART" = a ]; then
timeout 150 python3 -m pytest -q tests/test_int_wgmma.py -p no:cacheprovider --tb=short -m gpu \
  -x 2>&1 | tail -4
timeout 200 python3 benchmarks/int_wgmma_bench.py "$OUT/wgmma-rows.json" --rows 8,16,32,64 \
  > "$OUT/wgmma-rows.log" 2>&1; grep -A10 "^a layer" "$OUT/wgmma-rows.log"
exit 0
fi
run() {  # run TAG KILN_INT_WGMMA SPEC
  KILN_INT_WGMMA=$2 RUN_TAG=-$1 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=150 \
    bash benchmarks/gpu_suite.sh $3 2>&1 | grep -E "kiln |rror" | sed "s/^/[$1] /" \
    | tee -a "$OUT/e2e.log"
}
run warm 0 int4:throughput-64  # (compiles: not counted)
for i in 1 2; do
  run wg-$i "" int4:throughput-64; run off-$i 0 int4:throughput-64; run bf16-$i 0 throughput-64
  KILN_INT_WGMMA_CFG=64,128,0,3,1,1 run bars4-$i "" int4:throughput-64
done
run q4wg "" q4g32:throughput-64; run q4off 0 q4g32:throughput-64
