set -x
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
mkdir -p $OUT/r
timeout 170 python3 ab_exp/attn_vt.py $OUT/r/attn_vt.json > $OUT/r/attn_vt.log 2>&1
tail -30 $OUT/r/attn_vt.log
OUT=$OUT/r EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=200 bash benchmarks/gpu_suite.sh fp8:throughput-1k > $OUT/r/fp8-1k.log 2>&1
tail -12 $OUT/r/fp8-1k.log
OUT=$OUT/r EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=200 bash benchmarks/gpu_suite.sh throughput-1k > $OUT/r/bf16-1k.log 2>&1
tail -12 $OUT/r/bf16-1k.log
cd $OUT && tar czf r.tgz r && rm -rf r
