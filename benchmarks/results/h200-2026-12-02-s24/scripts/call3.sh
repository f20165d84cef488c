#!/usr/bin/env bash
# Session 24, call 3 (results in call3/): which Triton kernels compile inside the 128 / 128 run (its prompt
# steps took 3.2 s vs 1.9 s in the 23rd, one step 1.35-1.68 s), both V layouts; bf16 too;
# then SmoothQuant + int8 KV with either layout (real random weights: calibration).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
run() {  # run TAG V_T STAGE [NUM_REQUESTS] [EXTRA]
  KILN_KV_V_TRANSPOSED=$2 NUM_REQUESTS=${4:-1000} OUT=$R RUN_TAG=$1 \
    EXTRA_ARGS="${5---load-format dummy}" STAGE_TIMEOUT=${TMO:-120} bash benchmarks/gpu_suite.sh $3 2>&1 \
    | grep -E "^kiln|decode steps|prompt steps|Triton compiled|error"
  pack
}
run -w0 0 fp8:throughput; run -w1 1 fp8:throughput; run -w0b 0 fp8:throughput
run -w 0 throughput
TMO=300 run -vt1 1 sq8:throughput-1k 300 ""; run -vt0 0 sq8:throughput-1k 300 ""
