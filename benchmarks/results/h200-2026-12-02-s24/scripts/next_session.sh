#!/usr/bin/env bash
# For the next device session (one H200), from the repository root:
#   bash benchmarks/results/h200-2026-12-02-s24/scripts/next_session.sh a   (~6 minutes)
#   bash benchmarks/results/h200-2026-12-02-s24/scripts/next_session.sh b   (~5 minutes)
#   bash benchmarks/results/h200-2026-12-02-s24/scripts/next_session.sh c   (~7 minutes)
#   bash benchmarks/results/h200-2026-12-02-s24/scripts/next_session.sh d   (~6 minutes)
# a: the whole GPU suite (V transposed is the default for 1-byte caches since the 24th
#    session: its bit-equality and kernel tests passed there; the rotary-write test's new
#    tolerance, the mixed-step compile test and the rest have not run since).
# b: 128 / 128 x 1000, bf16 and FP8 + FP8 KV, twice each, now that no Triton compile lands
#    inside the run (the 23rd session's default mixed split made one: 1.5-2.1 s, bf16 fell
#    to 14,248, FP8 to 17,669-18,039); bf16 1000 / 1000 (300 requests) once.
# c: decode launches on the transposed e4m3 layout (attn_decode_vt.py --sweep: kiln's launch
#    was tuned when the loop took 253 registers, now 184); the TMA prefill probe against
#    SDPA on contiguous copies (its SDPA took the math backend in the 24th session), with
#    kiln's paged kernel on 64- / 128-token KV blocks, gathered and by TMA (paged_tma.py,
#    KILN_PREFILL_TMA: written in the 24th, never run on a GPU).
# d: lone-prompt TTFT at 8k and 32k tokens (one step: --max-num-tokens 32768), bf16, 16-token
#    blocks against 64-token blocks + KILN_PREFILL_TMA=1 (then 128): issue #12's 32k TTFT
#    row (1,413 ms vs transformers' 1,328 in the 11th session).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
run() {  # run TAG STAGE [NUM_REQUESTS]
  NUM_REQUESTS=${3:-1000} OUT=$R RUN_TAG=$1 EXTRA_ARGS="--load-format dummy" \
    STAGE_TIMEOUT=120 bash benchmarks/gpu_suite.sh $2 2>&1 \
    | grep -E "^kiln|decode steps|prompt steps|Triton compiled|error"
  pack
}
case ${1:-a} in
  a)
    OUT=$R STAGE_TIMEOUT=330 timeout 345 bash benchmarks/gpu_suite.sh tests > $R/suite.log 2>&1
    tail -n 3 $R/tests-*.log; pack ;;
  b)
    for i in 1 2; do run -$i throughput; run -$i fp8:throughput; done
    run "" throughput-1k 300 ;;
  c)
    timeout 200 python3 benchmarks/attn_decode_vt.py $R/vt_sweep.json --sweep \
      --decode 512x1536,256x1024,496x256,64x8192 > $R/vt_sweep.log 2>&1
    grep -v Warn $R/vt_sweep.log | grep "^decode" | head -70; pack
    timeout 240 python3 benchmarks/attn_prefill_tma.py $R/attn_tma.json \
      --lengths 4096,8192 > $R/attn_tma.log 2>&1
    grep -E "SDPA" $R/attn_tma.log | grep -v "^ *[0-9]* tma" | head -60; pack ;;
  d)
    for v in "16 0" "64 1" "128 1"; do set -- $v
      KILN_PREFILL_TMA=$2 timeout 150 python3 benchmarks/ttft.py --random-config llama-3.1-8b \
        --load-format dummy --max-seq-len 32768 --max-num-tokens 32768 --block-size $1 \
        --lengths 8000,32000 --variants 0 --repeats 3 --out $R/ttft-bs$1.json \
        > $R/ttft-bs$1.log 2>&1
      tail -4 $R/ttft-bs$1.log; pack
    done ;;
esac
