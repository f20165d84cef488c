export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
mkdir -p $OUT/r
OUT=$OUT/r EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=120 bash benchmarks/gpu_suite.sh fp8:throughput throughput > $OUT/r/t128.log 2>&1
grep -E "===|out tok|^kiln|steps" $OUT/r/t128.log
KILN_PROFILE_CPU=0 timeout 240 python3 -m kiln.cli bench throughput --random-config llama-3.1-8b --load-format dummy \
  --quantization fp8 --kv-cache-dtype fp8 --max-seq-len 2048 --input-len 1000 --output-len 1000 --num-requests 512 \
  --profile /tmp/prof1k --out $OUT/r/prof-fp8-1k.json > $OUT/r/prof-fp8-1k.log 2>&1
grep -v "^$" $OUT/r/prof-fp8-1k.log | grep -v "^-" | tail -45
cd $OUT && tar czf r.tgz r && rm -rf r
