#!/usr/bin/env bash
# Session 21, call 6 (one H200): e4m3 decode attention end to end, alternating (FP8 + FP8 KV):
# (The A/B ran on a tree with two experiment knobs, KILN_E4M3_DECODE_CONFIG and
# KILN_DECODE_PREFETCH, removed after: variant C became decode_config's e4m3 launch.)
# A = (64 keys, 2 stages, 2 warps) uncapped, the old launch; B = the same capped at 168
# registers (kv8_register_cap); C = 3 stages + PREFETCH=1, uncapped. act_mul_quant's new
# launch (>= 128 rows) in all.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
run() {  # variant stage tag
  case $1 in
    A) export KILN_KV8_DECODE_MAXNREG=0 KILN_DECODE_PREFETCH=0 KILN_E4M3_DECODE_CONFIG=64,2,2 ;;
    B) export KILN_KV8_DECODE_MAXNREG= KILN_DECODE_PREFETCH=0 KILN_E4M3_DECODE_CONFIG=64,2,2 ;;
    C) export KILN_KV8_DECODE_MAXNREG=0 KILN_DECODE_PREFETCH=1 KILN_E4M3_DECODE_CONFIG=64,3,2 ;;
  esac
  OUT=$R RUN_TAG=-$1-$3 NUM_REQUESTS=512 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=100 \
    bash benchmarks/gpu_suite.sh fp8:$2 2>&1 | grep -E "^kiln|decode steps|took"; pack
}
for v in A B C; do echo "== 1k $v"; run $v throughput-1k 1; done
for i in 1 2; do for v in A C; do echo "== 128 $v $i"; run $v throughput $i; done; done
