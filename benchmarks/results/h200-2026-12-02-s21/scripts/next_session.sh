#!/usr/bin/env bash
# The twenty-first session's untimed work, for the next device session (one H200), in two
# calls of under 10 minutes each. From the repository root:
#   here, first: mkdir ab_old && git archive HEAD kiln benchmarks | tar -x -C ab_old &&
#     git show 7141873:kiln/kernels/silu_mul.py > ab_old/kiln/kernels/silu_mul.py
#     (ab_old = this tree with act_mul_quant's one-tile launch; delete it after)
#   run: bash benchmarks/results/h200-2026-12-02-s21/scripts/next_session.sh a  (tests, sweeps)
#   run: bash benchmarks/results/h200-2026-12-02-s21/scripts/next_session.sh b  (end to end)
# Results under $OUT/r, packed into $OUT/r.tgz after every step.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
case ${1:-a} in
  a)
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short \
      tests/test_kernels_gpu.py tests/test_kernels_kvquant.py tests/test_kernels_fp8.py \
      -k "heads_per_program or act_mul_quant_in_slices or decode_attention" > $R/tests.log 2>&1
    tail -3 $R/tests.log; pack
    # decode attention at 128 / 128's contexts: KV heads a program (1 = kiln's kernel)
    SWEEP_SHAPES="496x192;496x128;992x192;512x1536" SWEEP_LAYOUTS=nhd \
      SWEEP_DTYPES=bf16,fp8,int8 SWEEP_HEADS=1,2,4 SWEEP_CONFIGS="64,2,4;64,3,2;32,3,2" \
      timeout 240 python3 benchmarks/attn_decode_sweep.py $R/attn_heads.json > $R/attn_heads.log 2>&1
    grep "^B=" $R/attn_heads.log; pack
    timeout 120 python3 benchmarks/small_kernels_bench.py $R/small_kernels.json --ms 256,496,1024 \
      > $R/small_kernels.log 2>&1; grep -v Warn $R/small_kernels.log; pack ;;
  b)
    for i in 1 2; do  # 128 / 128, FP8 + FP8 KV and bf16: KV heads a program 1 vs 4
      for h in 1 4; do
        for q in fp8: ""; do
          KILN_DECODE_HEADS_PER_PROGRAM=$h OUT=$R RUN_TAG=-heads$h-$i EXTRA_ARGS="--load-format dummy" \
            STAGE_TIMEOUT=60 bash benchmarks/gpu_suite.sh ${q}throughput 2>&1 | grep -E "^kiln|decode steps"
          pack
        done
      done
    done
    for i in 1 2; do  # act_mul_quant in slices (this tree) vs one tile (ab_old), FP8 128 / 128
      OUT=$R RUN_TAG=-act-new-$i EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=60 \
        bash benchmarks/gpu_suite.sh fp8:throughput 2>&1 | grep -E "^kiln|decode steps"
      (cd ab_old && OUT=$R RUN_TAG=-act-old-$i EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=60 \
        PYTHONPATH=$PWD bash benchmarks/gpu_suite.sh fp8:throughput 2>&1 | grep -E "^kiln|decode steps")
      pack
    done ;;
esac
