#!/usr/bin/env bash
# GPU tests of what changed since the 25th session's suite (the engine tests: the parallel
# compile at load, TMA on by default; the FP8 / KV kernel tests: 128-key decode tiles on the
# transposed layout), two groups at once; then cold loads of the 8B shape with Triton's
# cache empty, the warm-up's compiles one by one vs on 12 threads.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
group() { local name=$1; shift
  timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short "$@" \
    > $R/tests-$name.log 2>&1; echo "exit $?" >> $R/tests-$name.log; }
group e tests/test_gpu_engine.py &
group c tests/test_kernels_fp8.py tests/test_kernels_kvquant.py tests/test_v_transposed.py &
wait
for f in $R/tests-*.log; do echo "--- $f"; grep -E "passed|failed|FAILED|Error|exit" $f | tail -12; done
pack
for t in 0 12; do
  rm -rf /tmp/tc; TRITON_CACHE_DIR=/tmp/tc KILN_COMPILE_THREADS=$t timeout 100 \
    python3 -m kiln.cli bench throughput --random-config llama-3.1-8b --load-format dummy \
    --max-seq-len 2048 --input-len 128 --output-len 16 --num-requests 64 \
    --out $R/cold-t$t.json > $R/cold-t$t.log 2>&1
  python3 -c "import json; d = json.load(open('$R/cold-t$t.json')); print('threads $t', d['engine_load_s'], d.get('load_phases'), d['kiln'].get('output_tok_s', ''))"
  pack
done
