#!/usr/bin/env bash
# For the next device session (one H200), from the repository root:
#   bash benchmarks/results/h200-2026-12-02-s25/scripts/next_session.sh a   (~7.5 minutes)
#   bash benchmarks/results/h200-2026-12-02-s25/scripts/next_session.sh b   (~6 minutes)
#   bash benchmarks/results/h200-2026-12-02-s25/scripts/next_session.sh c   (~3 minutes)
#   bash benchmarks/results/h200-2026-12-02-s25/scripts/next_session.sh d   (~5 minutes)
# a: the whole GPU suite, its groups rebalanced (the engine tests alone: group e).
# b: bf16 on 16- vs 64-token KV blocks (TMA prefill tiles, the default on Hopper since the
#    25th session), one after the other: 1000 / 1000 x 300, 128 / 128 x 1000, batch 1 128 /
#    256 -- whether --block-size 64 should be the default for 16-bit caches on Hopper.
# c: decode launches on the transposed int8 layout (SmoothQuant engines' KV): the e4m3
#    sweep of the 25th session moved e4m3 to 128-key tiles (-12% at 512 x 1536); int8
#    still takes 64 keys, 4 warps, 2 stages (decode_config).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
run() {  # run TAG STAGE NUM_REQUESTS [EXTRA]
  NUM_REQUESTS=$3 OUT=$R RUN_TAG=$1 EXTRA_ARGS="--load-format dummy ${4:-}" \
    STAGE_TIMEOUT=120 bash benchmarks/gpu_suite.sh $2 2>&1 \
    | grep -E "^kiln|decode steps|prompt steps|Triton compiled|rror|tok/s"
  pack
}
case ${1:-a} in
  a)
    OUT=$R STAGE_TIMEOUT=420 timeout 435 bash benchmarks/gpu_suite.sh tests > $R/suite.log 2>&1
    tail -n 3 $R/tests-*.log; pack ;;
  b)
    for stage in throughput-1k:300 throughput:1000 latency-b1:1; do
      run -bs16 ${stage%:*} ${stage#*:}
      run -bs64 ${stage%:*} ${stage#*:} "--block-size 64"
    done ;;
  c)
    timeout 200 python3 benchmarks/attn_decode_vt.py $R/vt_sweep_int8.json --sweep --kv int8 \
      --decode 512x1536,256x1024,496x256,64x8192 > $R/vt_sweep_int8.log 2>&1
    grep -v Warn $R/vt_sweep_int8.log | grep "^decode" | head -70; pack ;;
esac
# d (~5 minutes; run as `... next_session.sh d`): cold loads, Triton's cache empty each time,
#    the warm-up's compiles one after another vs on 12 threads (KILN_COMPILE_THREADS,
#    kiln.runtime.precompile: opt-in until this), bf16 and FP8: engine_load_s in the JSON.
if [ "${1:-}" = d ]; then
  for q in "" "--quantization fp8 --kv-cache-dtype fp8"; do for t in 0 12; do
    rm -rf /tmp/tc; TRITON_CACHE_DIR=/tmp/tc KILN_COMPILE_THREADS=$t timeout 150 \
      python3 -m kiln.cli bench throughput --random-config llama-3.1-8b --load-format dummy \
      --max-seq-len 2048 --input-len 128 --output-len 16 --num-requests 64 $q \
      --out $R/cold-t$t${q:+-fp8}.json > $R/cold-t$t${q:+-fp8}.log 2>&1
    python3 -c "import json; d = json.load(open('$R/cold-t$t${q:+-fp8}.json')); print('threads $t ${q:+fp8}', d['engine_load_s'], d.get('load_phases'))"
    pack
  done; done
fi
