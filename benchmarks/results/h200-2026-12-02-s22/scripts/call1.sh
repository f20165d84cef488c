#!/usr/bin/env bash
# Twenty-second session, call 1 (one H200): GPU tests of the untimed work (several KV heads
# a program, act_mul_quant in slices, the L2 weight prefetch), then batch 1 with and
# without the L2 prefetch (bf16, FP8), then the decode attention sweep of KV heads a program.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
  tests/test_kernels_gpu.py tests/test_kernels_kvquant.py tests/test_kernels_fp8.py tests/test_gpu_engine.py \
  -k "heads_per_program or act_mul_quant_in_slices or l2_prefetch" > $R/tests.log 2>&1
tail -3 $R/tests.log; pack
for q in "" fp8:; do
  for mb in 0 32; do
    KILN_L2_PREFETCH_MB=$mb OUT=$R RUN_TAG=-pf$mb EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=80 \
      bash benchmarks/gpu_suite.sh ${q}latency-b1 2>&1 | grep -E "tok/s|TPOT|Error|error" | head -4
    pack
  done
done
SWEEP_SHAPES="496x192;496x128;992x192;512x1536" SWEEP_LAYOUTS=nhd \
  SWEEP_DTYPES=bf16,fp8 SWEEP_HEADS=1,2,4 SWEEP_CONFIGS="64,2,4;64,3,2" \
  timeout 150 python3 benchmarks/attn_decode_sweep.py $R/attn_heads.json > $R/attn_heads.log 2>&1
grep "^B=" $R/attn_heads.log | head -40; pack
