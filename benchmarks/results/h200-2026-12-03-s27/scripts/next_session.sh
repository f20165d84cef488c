#!/usr/bin/env bash
# For the next device session (one H200), from the repository root:
#   bash benchmarks/results/h200-2026-12-03-s27/scripts/next_session.sh a   (~5 minutes)
#   bash benchmarks/results/h200-2026-12-03-s27/scripts/next_session.sh b   (~5 minutes)
# a: the KV-cache kernel tests (int8 transposed vs usual layout: bound loosened to one bf16
#    ulp, not re-run), then call6.sh: the swapped FP8 GEMM on the quantized LM head's shape
#    and at 17-64 tokens, the batch-1 small kernels at 1 / 4 rows, the e4m3 decode launches
#    at batch 1 with the engine's 8 splits.
# b: end to end, each against KILN_* off, alternating: SmoothQuant + int8 KV 1000 / 1000 x 300
#    (the int8 128-key decode launch, against the session before's tree in ab_old/ if
#    present), bf16 batch 1 with KILN_GREEDY_KERNEL 1 / 0.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
S=benchmarks/results/h200-2026-12-03-s27/scripts
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
case ${1:-a} in
  a)
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_kernels_kvquant.py \
      > $R/tests-kv.log 2>&1; tail -n 2 $R/tests-kv.log; pack
    OUT=$OUT bash $S/call6.sh ;;
  b)
    B="bench throughput --random-config llama-3.1-8b --max-seq-len 2048 --quantization int8_sq \
      --kv-cache-dtype int8 --input-len 1000 --output-len 1000 --num-requests 300"
    timeout 200 python3 -m kiln.cli $B --out $R/sq8-new.json > $R/sq8-new.log 2>&1
    grep -h "^kiln" $R/sq8-new.log; pack
    if [ -d ab_old ]; then
      (cd ab_old && PYTHONPATH=$PWD timeout 200 python3 -m kiln.cli $B --out $R/sq8-old.json \
        > $R/sq8-old.log 2>&1); grep -h "^kiln" $R/sq8-old.log; pack
    fi
    B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
      --input-len 128 --output-len 256"
    for i in 1 2; do for g in 1 0; do
      KILN_GREEDY_KERNEL=$g timeout 70 python3 -m kiln.cli $B --out $R/b1-bf16-g$g-$i.json \
        > $R/b1-bf16-g$g-$i.log 2>&1; grep -h "^kiln" $R/b1-bf16-g$g-$i.log; pack
    done; done ;;
esac
