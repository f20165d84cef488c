#!/usr/bin/env bash
# 55th session, one device call (nvidia-h200 or -h100-x1, carry .whl; ab_old/ = HEAD's kiln
# and benchmarks before this session's changes, untracked):
#  1. GPU tests: the TMA GEMV engine test (logprobs to rounding, epilogues now default),
#     the Gluon kernel's 128-row blocks, every row count of int_weight_linear
#  2. mutate_check.py: the engine comparison against a TMA GEMV with rolled outputs
#  3. int_prefill_bench at 65 / 128 / 200 rows ("kiln" now: Gluon in 128-row blocks for
#     int4, digit-plane tiles for int8)
#  4. 128 requests of 128 / 256, int4 and int8_wo, new vs old (ab_old), and batch 1 int4
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
mkdir -p /tmp/site && pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:$PWD/benchmarks:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/0card.log"
timeout 200 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_int4_gemv_tma.py \
  tests/test_int_wgmma.py "tests/test_kernels_int.py::test_gpu_int_linear" --tb=short 2>&1 \
  | grep -Ev "Writing|^$" | tail -25 > "$OUT/1tests.log"; tail -6 "$OUT/1tests.log"
timeout 90 python3 benchmarks/results/2026-12-07-s55/mutate_check.py 2>&1 | grep -E "^(real|rolled)" \
  | tee "$OUT/2mutate.log"
timeout 150 python3 benchmarks/int_prefill_bench.py /tmp/prefill.json --rows 65,128,200 \
  > "$OUT/3prefill.log" 2>&1; grep -A40 "^a layer" "$OUT/3prefill.log" | grep -E "kiln|cublas"
run() {  # run DIR TAG SPEC [ENV...]
  (cd "$1" && env "${@:4}" RUN_TAG=-$2 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=100 \
    PYTHONPATH=$PWD:$PWD/benchmarks:/tmp/site bash benchmarks/gpu_suite.sh $3 2>&1 \
    | grep -E "kiln |rror" | sed "s/^/[$2] /" | tee -a "$OUT/4e2e.log")
}
export NUM_REQUESTS=128
for i in ${ROUNDS:-1 2}; do
  run . int4-new$i int4:throughput-few; run ab_old int4-old$i int4:throughput-few
  run . int8-new$i int8w:throughput-few; run ab_old int8-old$i int8w:throughput-few
done
run . bf16 throughput-few
rm -f "$OUT"/*.json "$OUT"/*.png
