#!/usr/bin/env bash
# Calls 6-10 of the twenty-second session (one H200), each a one-line device command; from
# the repository root, PYTHONPATH=$PWD, with ab_old/ as in ../../h200-2026-12-02-s21/scripts/next_session.sh.
# 6: the small kernels with CUDA-graph timing, a 128 / 128 decode step's rows and a prefill step's
python3 benchmarks/small_kernels_bench.py $OUT/small_kernels.json --ms 496,16384
# 7: prefill attention launches for one 1024-token prompt
python3 benchmarks/attn_prefill_sweep.py $OUT/prefill_1k.json --lengths 1024 --rep-ms 40
# 8: a few launches at the prompt mixes a step holds (then again after the small-grid launch)
python3 benchmarks/attn_prefill_batch.py $OUT/prefill_batch.json
# 9-10: FP8 TTFT of a lone 1000-token prompt, this tree vs ab_old/, alternating
for i in 1 2 3; do
  RUN_TAG=-new$i EXTRA_ARGS="--load-format dummy" bash benchmarks/gpu_suite.sh fp8:ttft
  (cd ab_old && RUN_TAG=-old$i EXTRA_ARGS="--load-format dummy" PYTHONPATH=$PWD bash benchmarks/gpu_suite.sh fp8:ttft)
done
