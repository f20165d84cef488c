#!/usr/bin/env bash
# 27th session, call 1 (one H200): the reworked fp8_mid GPU test; batch-1 profiles (bf16,
# FP8 + FP8 KV: the per-kernel table of kiln bench latency --profile); FP8 + FP8 KV end to end
# where decode batches hold 65-256 rows, KILN_FP8_MID_TENSORWISE 1 vs 0 (s26 next_session b).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_fp8_mid.py > $R/tests.log 2>&1
tail -2 $R/tests.log; pack
for q in "" "--quantization fp8 --kv-cache-dtype fp8"; do
  t=b1${q:+-fp8}
  KILN_PROFILE_CPU=0 timeout 100 python3 -m kiln.cli bench latency --random-config llama-3.1-8b --load-format dummy \
    --max-seq-len 2048 --input-len 128 --output-len 256 $q --profile /tmp/prof-$t \
    --out $R/$t.json > $R/$t.log 2>&1
  grep -E "tok/s|TPOT" $R/$t.log | head -3
  timeout 60 python3 benchmarks/trace_gaps.py /tmp/prof-$t/trace.json --by-kernel --top 40 --out $R/gaps-$t.json > $R/gaps-$t.log 2>&1
  gzip -c /tmp/prof-$t/trace.json > $R/trace-$t.json.gz
  pack
done
for spec in "1000 1000 300 256" "128 128 1000 128"; do set -- $spec
  for on in 1 0; do
    KILN_FP8_MID_TENSORWISE=$on timeout 110 python3 -m kiln.cli bench throughput \
      --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
      --quantization fp8 --kv-cache-dtype fp8 --input-len $1 --output-len $2 \
      --num-requests $3 --max-batch-size $4 --out $R/fp8-$1-mb$4-mid$on.json \
      > $R/fp8-$1-mb$4-mid$on.log 2>&1
    echo "== $1/$2 x $3, max batch $4, mid $on"; grep -E "^kiln|steps:" $R/fp8-$1-mb$4-mid$on.log
    pack
  done
done
