#!/usr/bin/env bash
# Re-run chosen GPU tests in three groups at once (GPU 0, GPU 1, both for the parallel
# tests), a log each under $OUT: bash benchmarks/gpu_retest.sh "A tests" "B tests" "P tests"
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD KILN_CACHE=${KILN_CACHE:-/tmp/kiln-cache} TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 TQDM_DISABLE=1
G=${STAGE_TIMEOUT:-300}
group() { local name=$1 gpus=$2 tests=$3; [ -z "$tests" ] && return
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=$gpus timeout "$G" python3 -m pytest -q -m gpu -p no:cacheprovider -rf \
    --tb=short $tests > "$OUT/retest-$name.log" 2>&1; echo "exit $?" >> "$OUT/retest-$name.log"; }
group a 0 "${1:-}" & group b 1 "${2:-}" & group p 0,1 "${3:-}" & wait
for f in "$OUT"/retest-*.log; do echo "--- $f"; grep -E "passed|failed|FAILED|Error|exit" "$f" | tail -12; done
