#!/usr/bin/env bash
# For the next device session (one H200), written in the 36th after its device time ran out.
#   bash next_session.sh a      (one device call, ~6 minutes)
# a: where a SmoothQuant 1000 / 1000 decode step's time goes (#10 asks 1.3x bf16; the 36th
# measured 1.26x: 12,775 vs 10,129, decode 20.6 vs 25.2 ms a token, the run's printout 76%
# of its floor). A mid-run decode step: 296 requests at a 1500-token context, int8_sq +
# int8 KV beside bf16 + bf16 KV, the top kernels of 10 steps each (torch.profiler): how much
# is attention on the 1-byte cache, how much the W8A8 GEMMs, how much the small kernels.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
for v in sq8 bf16; do
  case $v in
    sq8) q="--quantization int8_sq --kv-cache-dtype int8" ;;  # calibrated: weights stored
    bf16) q="--load-format dummy" ;;
  esac
  timeout 200 python3 -m kiln.cli build --random-weights --config llama-3.1-8b \
    --max-seq-len 2048 --max-batch-size 512 $q -o /tmp/e-$v > $OUT/build-$v.log 2>&1
  tail -n 1 $OUT/build-$v.log
  timeout 150 python3 benchmarks/profile_decode.py /tmp/e-$v --profile-only --profile-batch 296 \
    --context 1500 --kv-fraction 0.75 > $OUT/profile-$v.log 2>&1
  head -n 3 $OUT/profile-$v.log; grep -A 26 "GPU kernel time" $OUT/profile-$v.log | cut -c 1-140
done
