#!/usr/bin/env bash
# For the next device session (one H200), from the repository root, after
#   mkdir ab_old && git archive ae635e7 kiln benchmarks | tar -x -C ab_old   (the 28th's start)
#   bash benchmarks/results/h200-2026-12-03-s28/scripts/next_session.sh a   (~8 minutes)
#   bash benchmarks/results/h200-2026-12-03-s28/scripts/call5.sh a          (~4 minutes)
#   bash benchmarks/results/h200-2026-12-03-s28/scripts/call5.sh b          (~5 minutes)
# a: the GPU tests of the splits combined in the decode kernel (KILN_DECODE_FUSED_REDUCE,
#    kiln.kernels.attention_splits, opt-in) and of decode attention, then batch 1 end to
#    end with it on / off, alternating, two runs each: bf16, and FP8 + FP8 KV with
#    --quantize-lm-head (one reduce launch a layer fewer: ~1.7-1.9 us of ~4.65 / 3.0 ms).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_kernels_gpu.py \
  -k "decode" > $R/tests-fused.log 2>&1; tail -n 2 $R/tests-fused.log; pack
KILN_DECODE_FUSED_REDUCE=1 timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf \
  tests/test_gpu_engine.py -k "fp8 or v_transposed" > $R/tests-fused-engine.log 2>&1
tail -n 2 $R/tests-fused-engine.log; pack
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
  --input-len 128 --output-len 256"
for q in "" "--quantization fp8 --kv-cache-dtype fp8 --quantize-lm-head"; do
  t=b1${q:+-fp8}
  for i in 1 2; do for f in 1 0; do
    KILN_DECODE_FUSED_REDUCE=$f timeout 75 python3 -m kiln.cli $B $q --out $R/$t-f$f-$i.json \
      > $R/$t-f$f-$i.log 2>&1
    echo "$t fused=$f"; grep -h "^kiln" $R/$t-f$f-$i.log; pack
  done; done
done
