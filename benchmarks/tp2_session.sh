#!/usr/bin/env bash
# Issue #9's runs on two GPUs (device kind nvidia-h200-x2), one device call a letter:
#   bash benchmarks/tp2_session.sh a   # GPU parallel tests; batch 1 TP1 / TP2 / TP2-NCCL, twice (~8 min)
#   bash benchmarks/tp2_session.sh b   # 1000 / 1000 x NUM_REQUESTS (300): TP1, TP2, PP2, PP2 depth 3 (~8 min)
#   bash benchmarks/tp2_session.sh c   # two torchrun "nodes" x 1 GPU vs one TP2 process group (~6 min)
#   bash benchmarks/tp2_session.sh d   # Llama-3.1-70B shape, FP8 + FP8 KV, TP2: batch 1 and 1000 / 1000 x 100
# The last TP2 numbers (10th session) predate the swapped GEMVs, the epilogues and PDL of
# sessions 29-36 (one GPU: 212 -> 242 tok/s at batch 1), so a and b are the first runs of
# them on two GPUs. Every step is bounded by `timeout`, and its output lands in $OUT as it
# goes (a hung NCCL teardown must not eat the call).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} KILN_CACHE=${KILN_CACHE:-/tmp/kiln-cache}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
S="bash benchmarks/gpu_suite.sh"
case ${1:-} in
  a) STAGE_TIMEOUT=420 OUT=$OUT/a $S tests > "$OUT/a-tests.log" 2>&1
     grep -E "passed|failed|exit" "$OUT"/a/tests-parallel.log | tail -5
     for i in 1 2; do
       RUN_TAG=-r$i STAGE_TIMEOUT=240 OUT=$OUT/a $S latency-b1 tp2:latency-b1 tp2nccl:latency-b1 2>&1 \
         | tee -a "$OUT/a-latency.log" | grep -E "^===|^kiln"
     done ;;
  b) for spec in throughput-1k tp2:throughput-1k pp2:throughput-1k; do
       NUM_REQUESTS=${NUM_REQUESTS:-300} STAGE_TIMEOUT=240 OUT=$OUT/b $S $spec 2>&1 \
         | tee -a "$OUT/b.log" | grep -E "^===|^kiln|steps:"
     done
     NUM_REQUESTS=${NUM_REQUESTS:-300} STAGE_TIMEOUT=240 EXTRA_ARGS="--pipeline-depth 3" RUN_TAG=-d3 \
       OUT=$OUT/b $S pp2:throughput-1k 2>&1 | tee -a "$OUT/b.log" | grep -E "^===|^kiln|steps:" ;;
  c) E=/tmp/kiln-tp2-8b
     timeout 300 python3 -m kiln.cli build --random-weights --config llama-3.1-8b --tp-size 2 \
       --max-seq-len 2048 -o $E > "$OUT/c-build.log" 2>&1; tail -2 "$OUT/c-build.log"
     B="bench throughput $E --input-len 1000 --output-len 1000 --num-requests ${NUM_REQUESTS:-300}"
     timeout 300 python3 -m kiln.cli $B --out "$OUT/c-one-group.json" > "$OUT/c-one-group.log" 2>&1
     grep -E "^kiln|steps:" "$OUT/c-one-group.log"
     # two "nodes" on the one host: a torchrun agent per GPU, c10d rendezvous over loopback
     for r in 0 1; do
       CUDA_VISIBLE_DEVICES=$r timeout 360 torchrun --nnodes 2 --nproc-per-node 1 --node-rank $r \
         --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29555 --rdzv-id kiln-c -m kiln $B \
         --out "$OUT/c-two-nodes.json" > "$OUT/c-node$r.log" 2>&1 &
     done
     wait; grep -E "^kiln|steps:|Error|error" "$OUT"/c-node*.log | tail -8 ;;
  d) # 70B FP8 fits one H200 (~70 GB) and two; weights drawn on the GPUs (nothing stored)
     for tp in 1 2; do
       timeout 420 python3 -m kiln.cli bench latency --random-config llama-3.1-70b --load-format dummy \
         --quantization fp8 --kv-cache-dtype fp8 --tp-size $tp --max-seq-len 2048 --input-len 128 \
         --output-len 256 --out "$OUT/d-70b-fp8-tp$tp-b1.json" > "$OUT/d-tp$tp-b1.log" 2>&1
       grep -E "^kiln|roofline" "$OUT/d-tp$tp-b1.log"
     done
     timeout 500 python3 -m kiln.cli bench throughput --random-config llama-3.1-70b --load-format dummy \
       --quantization fp8 --kv-cache-dtype fp8 --tp-size 2 --max-seq-len 2048 --input-len 1000 \
       --output-len 1000 --num-requests 100 --out "$OUT/d-70b-fp8-tp2-1k.json" > "$OUT/d-tp2-1k.log" 2>&1
     grep -E "^kiln|steps:" "$OUT/d-tp2-1k.log" ;;
  *) echo "usage: $0 a|b|c|d"; exit 2 ;;
esac
