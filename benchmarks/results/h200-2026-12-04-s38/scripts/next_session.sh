#!/usr/bin/env bash
# For the next device session (one H200), written in the 38th after its device time ran out.
#   bash next_session.sh a      (one device call, ~7 minutes)
#   bash next_session.sh b      (one device call, ~6 minutes)
#   bash next_session.sh c      (one device call, ~8 minutes; written in the 39th, no device)
#   bash next_session.sh d      (one device call, ~5 minutes; written in the 39th)
# c and d ran in the 40th session (benchmarks/results/h200-2026-12-05-s40/call1, call2);
# a and b are still to run.
# a: decode graph routes (KILN_GRAPH_ROUTE, kiln/runtime/cuda_graphs.py route_buckets, on by
# default since the 38th) where the 38th's pairs were noise: FP8 + FP8 KV 1000 / 1000 x 300
# (297 rows replay the 368 graph: 9.06 -> 8.40 ms a replay; pairs +3.9% and -1.5%), three
# more alternating pairs; and a batch on FP8's 385-480 -> 512 route (420 requests, 11.3 ->
# 9.8 ms a replay). If routes lose beyond the spread, raise ROUTE_MARGIN or drop the FP8
# routes; either way the numbers go to BENCHMARKS.md (38th section's table).
# b: the bf16 cliff pair again (440 requests: 1.12x in the 38th, one pair), then the int8 KV
# decode launches at SmoothQuant's batch sizes (the 38th found 32 keys / 2 warps / 2 stages /
# prefetch 4% ahead of kiln's 128 / 2 / 3 / none at 296 x 1500, behind at 512 x 1536): where
# does the small tile win? If by > 3% over a band of batch sizes, a rule in decode_config
# (it would need the batch: DecodeGraphs captures per bucket, so the bucket can pass it).
# c: prompt attention through PyTorch's FlashAttention over gathered K / V (KILN_PREFILL_FLASH=1,
# kiln/kernels/attention_flash.py, opt-in until this runs): its GPU tests, then
# benchmarks/attn_prefill_flash.py (8k: SDPA flash vs kiln Triton vs kiln flash, gather
# included; issue #12's >= 1.0x SDPA), then lone-prompt TTFT at 8k / 32k with it off / on
# (16-token blocks; the 25th: 217.9 / 1,406.9 ms). If the flash path wins at every case and
# the tests pass, make it the default (ENABLED: "1" unless KILN_PREFILL_FLASH=0) and run
# bf16 1000 / 1000 x 300 off / on (prompt steps' share) in the next call.
# d: is FP8 128 / 128 bound by the host? Its decode steps took 12.1 ms at ~500 rows against
# 9.8 ms for the 512-row graph's replay (38th). kiln bench now prints how long the host
# waited for sampled tokens in the decode steps (kiln.runtime.step.TOKEN_WAIT): near 0 means
# the device waited on the host. The 39th cut the host's work a 512-row step by 25% on the
# 2-core CPU (benchmarks/host_step.py: 8.67 -> 6.51 ms): this card's host measured the same
# way, then FP8 and bf16 128 / 128 x 1000 once each (compare with the 38th: 25.4k / 17.8k).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
run() {  # tag route limit args...
  local tag=$1 r=$2 limit=$3; shift 3
  KILN_GRAPH_ROUTE=$r timeout $limit python3 -m kiln.cli bench throughput \
    --random-config llama-3.1-8b --max-seq-len 2048 --load-format dummy "$@" \
    --out $OUT/$tag-r$r.json > $OUT/$tag-r$r.log 2>&1
  echo "$tag route=$r $(grep -h '^kiln ' $OUT/$tag-r$r.log | tail -1) t=$SECONDS"
  grep -h "^decode steps" $OUT/$tag-r$r.log
}
FP8="--quantization fp8 --kv-cache-dtype fp8"
if [[ " ${*:-a} " == *" a "* ]]; then
  for i in 1 2 3; do
    for r in 1 0; do
      [ $SECONDS -gt 420 ] && break 2
      run fp8k1-$i $r 120 $FP8 --input-len 1000 --output-len 1000 --num-requests 300
    done
  done
  for r in 0 1; do
    [ $SECONDS -lt 500 ] && run fp8b420 $r 80 $FP8 --input-len 128 --output-len 512 --num-requests 420
  done
  grep -h "replayed for faster" $OUT/fp8b420-r1.log | cut -c 1-600
  python3 -c "import json; print('FP8 replay ms', json.load(open('$OUT/fp8b420-r1.json')).get('graph_replay_ms'))"
  rm -f $OUT/*.json $OUT/*.png
fi
if [[ " ${*:-a} " == *" b "* ]]; then
  for r in 0 1; do run b440 $r 80 --input-len 128 --output-len 512 --num-requests 440; done
  python3 -c "import json; print('bf16 replay ms', json.load(open('$OUT/b440-r1.json')).get('graph_replay_ms'))"
  rm -f $OUT/*.json $OUT/*.png
  timeout 240 python3 benchmarks/attn_decode_vt.py $OUT/sweep-int8.json --sweep --kv int8 \
    --decode 128x1500,200x1500,296x1000,296x2000,384x1500 > $OUT/sweep-int8.log 2>&1
  grep -v "differs" $OUT/sweep-int8.log | grep "kiln, V transposed\|32 keys, 2 warps, 2 stages, prefetch 1"
  rm -f $OUT/*.json
fi
if [[ " ${*:-a} " == *" c "* ]]; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider \
    "tests/test_kernels_gpu.py::test_prefill_attention_flash" \
    "tests/test_gpu_engine.py::test_flash_prompt_attention_keeps_logits" > $OUT/tests.log 2>&1
  tail -15 $OUT/tests.log; echo "tests t=$SECONDS"
  timeout 150 python3 benchmarks/attn_prefill_flash.py $OUT/attn-flash.json > $OUT/attn-flash.log 2>&1
  cat $OUT/attn-flash.log; echo "bench t=$SECONDS"
  timeout 60 python3 benchmarks/attn_prefill_flash.py --kv e4m3 --cases 8192,16x1000 \
    > $OUT/attn-flash-e4m3.log 2>&1; cat $OUT/attn-flash-e4m3.log
  for f in 0 1; do
    [ $SECONDS -gt 420 ] && break
    KILN_PREFILL_FLASH=$f timeout 90 python3 benchmarks/ttft.py --random-config llama-3.1-8b \
      --load-format dummy --max-seq-len 32768 --max-num-tokens 32768 \
      --lengths 8000,32000 --variants 0 --repeats 3 --out $OUT/ttft-f$f.json > $OUT/ttft-f$f.log 2>&1
    echo "flash=$f"; tail -3 $OUT/ttft-f$f.log
  done
  rm -f $OUT/ttft-*.json
fi
if [[ " ${*:-a} " == *" d "* ]]; then
  timeout 120 python3 benchmarks/host_step.py --batch 256,512 --repeats 3 > $OUT/host-step.log 2>&1
  timeout 60 python3 benchmarks/host_step.py --batch 512 --repeats 3 --stream >> $OUT/host-step.log 2>&1
  cat $OUT/host-step.log; echo "host t=$SECONDS"
  run fp8-128 1 100 $FP8 --input-len 128 --output-len 128 --num-requests 1000
  run bf16-128 1 100 --input-len 128 --output-len 128 --num-requests 1000
  grep -h "steps:" $OUT/fp8-128-r1.log $OUT/bf16-128-r1.log
  rm -f $OUT/*.json $OUT/*.png
fi
