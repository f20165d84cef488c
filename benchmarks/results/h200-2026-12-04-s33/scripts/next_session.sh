#!/usr/bin/env bash
# For the next device session (one H200, ~250 s), written in the 33rd after its device time
# ran out. int4 at 64 rows (issue #10: 64 x 512 / 256 >= bf16, 0.83x): the pre-summed magic
# tiles (KILN_INT_PRESUM=1, IntGemmConfig.presum; untimed) against the default launches,
# then end to end if a layer gets faster. First their GPU test.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_kernels_int.py \
  -k "opt_in_gemv_launches and 4-128" > $OUT/tests.log 2>&1; tail -n 3 $OUT/tests.log
# a layer's four linears at 16 and 64 rows: auto, the magic launches, sum_dot and presum
timeout 200 python3 benchmarks/int_batch_bench.py $OUT/int-batch.json --rows 16,64 --bits 4 \
  --magic > $OUT/int-batch.log 2>&1; grep -A3 "^per layer" $OUT/int-batch.log
# end to end, int4 g128, 64 x 512 / 256: default, then KILN_INT_PRESUM=1 (alternating)
T="bench throughput --random-config llama-3.1-8b --load-format dummy --quantization int4_wo --group-size 128 \
  --input-len 512 --output-len 256 --num-requests 64 --max-seq-len 2048"
for i in 1 2; do for p in 0 1; do
  KILN_INT_PRESUM=$p timeout 120 python3 -m kiln.cli $T --out $OUT/t64-p$p-$i.json \
    > $OUT/t64-p$p-$i.log 2>&1; echo "int4 64 x 512 / 256, presum $p"; grep -h "^kiln" $OUT/t64-p$p-$i.log
done; done
