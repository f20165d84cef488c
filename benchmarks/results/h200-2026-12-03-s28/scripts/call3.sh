#!/usr/bin/env bash
# 28th session, call 3 (one H200): GPU tests of the swapped FP8 GEMM at 17-64 rows (32- /
# 64-token tiles), e4m3 decode on 64-key tiles where a split gets <= 512 keys; then end to
# end against the session's start (ab_old/: `git archive ae635e7 kiln benchmarks`),
# alternating: FP8 + FP8 KV batch 1 (--quantize-lm-head), 32 and 64 requests at max batch
# 32 / 64 (decode steps of 17-64 rows), 128 / 128 x 1000. Part a: tests, batch 1; b: the rest.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
Q="--random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 --quantization fp8 \
  --kv-cache-dtype fp8"
if [ "${1:-a}" = a ]; then
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_kernels_fp8.py \
  tests/test_kernels_kvquant.py tests/test_kernels_gpu.py > $R/tests-kernels.log 2>&1 &
timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_gpu_engine.py \
  -k "fp8 or v_transposed" > $R/tests-engine.log 2>&1
wait; tail -n 2 $R/tests-kernels.log $R/tests-engine.log; pack
fi
run() {  # name, timeout, args...
  local n=$1 t=$2; shift 2
  timeout $t python3 -m kiln.cli "$@" --out $R/$n-new.json > $R/$n-new.log 2>&1
  (cd ab_old && PYTHONPATH=$PWD timeout $t python3 -m kiln.cli "$@" --out $R/$n-old.json \
    > $R/$n-old.log 2>&1)
  echo "$n"; grep -h "^kiln" $R/$n-new.log $R/$n-old.log; pack
}
if [ "${1:-a}" = a ]; then for i in 1 2; do
  run b1-$i 75 bench latency $Q --quantize-lm-head --input-len 128 --output-len 256
done; exit; fi
run m32 90 bench throughput $Q --input-len 128 --output-len 512 --num-requests 64 --max-batch-size 32
run m64 90 bench throughput $Q --input-len 128 --output-len 512 --num-requests 128 --max-batch-size 64
run t128 120 bench throughput $Q --input-len 128 --output-len 128 --num-requests 1000
