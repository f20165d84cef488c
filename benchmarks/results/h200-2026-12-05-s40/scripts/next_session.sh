#!/usr/bin/env bash
# For the next device session (one H200), written in the 40th after its device time ran out.
#   bash next_session.sh e      (one device call, ~8 minutes)
#   bash next_session.sh f      (one device call, ~6 minutes; after e, if e's numbers win)
#   a / b: the 38th's, still unrun: bash ../../h200-2026-12-04-s38/scripts/next_session.sh a|b
# e: whole prompts through SDPA (cuDNN) over the step's own K / V (KILN_PREFILL_SDPA=1,
# kiln/kernels/attention_sdpa.py, opt-in until this runs): its GPU tests, then
# benchmarks/attn_prefill_sdpa.py (bf16 and e4m3: "kiln sdpa, paged" against "kiln triton,
# paged"; the 40th measured SDPA's cuDNN at 0.99 ms at 8k against Triton's 1.49), then a
# lone prompt's TTFT at 8k / 32k off / on (the 40th: 224.2 / 1,420.5 ms; --max-num-tokens
# 32768 so that the 32k prompt is one chunk, with nothing cached before it).
# f: bf16 and FP8 1000 / 1000 x 300 off / on (prompt steps' time; the 38th: bf16 9.6k).
# If e's kernel numbers win at every size and f does not lose, make it the default
# (ENABLED unless KILN_PREFILL_SDPA=0) and tune MIN_TOKENS from e's 1k / 4k lines.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if [[ " ${*:-e} " == *" e "* ]]; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider \
    "tests/test_kernels_gpu.py::test_prefill_attention_sdpa" \
    "tests/test_gpu_engine.py::test_sdpa_prompt_attention_keeps_logits" > $OUT/tests.log 2>&1
  tail -15 $OUT/tests.log; echo "tests t=$SECONDS"
  timeout 150 python3 benchmarks/attn_prefill_sdpa.py --cases 1024,4096,8192,32768,16x1000 \
    2>&1 | grep -v "Warning\|return F\|^  " > $OUT/attn.log
  timeout 60 python3 benchmarks/attn_prefill_sdpa.py --kv e4m3 --cases 8192,16x1000 \
    2>&1 | grep -v "Warning\|return F\|^  " >> $OUT/attn.log
  grep "kiln" $OUT/attn.log; echo "bench t=$SECONDS"
  for f in 0 1; do
    [ $SECONDS -gt 420 ] && break
    KILN_PREFILL_SDPA=$f timeout 90 python3 benchmarks/ttft.py --random-config llama-3.1-8b \
      --load-format dummy --max-seq-len 32768 --max-num-tokens 32768 \
      --lengths 8000,32000 --variants 0 --repeats 3 --out $OUT/ttft-s$f.json > $OUT/ttft-s$f.log 2>&1
    echo "sdpa=$f"; tail -3 $OUT/ttft-s$f.log
  done
  rm -f $OUT/ttft-*.json
fi
if [[ " ${*:-e} " == *" f "* ]]; then
  for q in none fp8; do
    for f in 0 1; do
      [ $SECONDS -gt 480 ] && break 2
      extra=""; [ $q = fp8 ] && extra="--quantization fp8 --kv-cache-dtype fp8"
      KILN_PREFILL_SDPA=$f timeout 120 python3 -m kiln.cli bench throughput \
        --random-config llama-3.1-8b --max-seq-len 2048 --load-format dummy $extra \
        --input-len 1000 --output-len 1000 --num-requests 300 --out $OUT/$q-s$f.json \
        > $OUT/$q-s$f.log 2>&1
      echo "$q sdpa=$f $(grep -h '^kiln ' $OUT/$q-s$f.log | tail -1) t=$SECONDS"
      grep -h "^prompt steps\|^decode steps" $OUT/$q-s$f.log
    done
  done
  rm -f $OUT/*.json $OUT/*.png
fi
