#!/usr/bin/env bash
# For the next device session (one H200), from the repository root:
#   bash benchmarks/results/h200-2026-12-03-s26/scripts/next_session.sh a   (~4 minutes)
#   bash benchmarks/results/h200-2026-12-03-s26/scripts/next_session.sh b   (~5 minutes)
# a: the GPU test of kiln.kernels.fp8_mid and the FP8 kernel tests, then fp8_gemm.py at
#    64-384 rows with KILN_FP8_MID_TENSORWISE=1 and 0 (the "auto" column is what
#    fp8_linear picks). Run in the 26th session (call 5) already, before the window was cut
#    to 65-192 rows (256 where K > N); repeat only to check that cut.
# b: FP8 + FP8 KV end to end where decode batches hold 65-256 rows (max batch 256 and 128,
#    1000 / 1000 x 300 and 128 / 128 x 1000), the mid-row path (on by default since the 26th
#    session) on and off, alternating: its end-to-end effect, not yet measured.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
case ${1:-a} in
  a)
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_fp8_mid.py \
      tests/test_kernels_fp8.py > $R/tests.log 2>&1; tail -3 $R/tests.log
    for on in 0 1; do
      KILN_FP8_MID_TENSORWISE=$on timeout 90 python3 benchmarks/fp8_gemm.py \
        --ms 64,96,128,192,256,384 --out $R/mid-$on.json > $R/mid-$on.log 2>&1
      echo "== KILN_FP8_MID_TENSORWISE=$on"; grep -A26 "^     N      K     M  *bf16" $R/mid-$on.log
    done; pack ;;
  b)
    for spec in "1000 1000 300 256" "128 128 1000 128"; do set -- $spec
      for on in 1 0; do
        KILN_FP8_MID_TENSORWISE=$on timeout 120 python3 -m kiln.cli bench throughput \
          --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
          --quantization fp8 --kv-cache-dtype fp8 --input-len $1 --output-len $2 \
          --num-requests $3 --max-batch-size $4 --out $R/fp8-$1-mb$4-mid$on.json \
          > $R/fp8-$1-mb$4-mid$on.log 2>&1
        echo "== $1/$2 x $3, max batch $4, mid $on"; grep -E "^kiln|steps:" $R/fp8-$1-mb$4-mid$on.log
        pack
      done
    done ;;
esac
