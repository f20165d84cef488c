export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r7; mkdir -p $R
pack() { tar czf $OUT/r.tgz -C /tmp r7; }
timeout 130 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_kernels_kvquant.py > $R/tests-kvquant.log 2>&1; tail -3 $R/tests-kvquant.log; pack
for i in 1 2; do
  (cd ab_old && OUT=$R RUN_TAG=-old$i NUM_REQUESTS=512 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=80 bash benchmarks/gpu_suite.sh fp8:throughput-1k 2>&1 | grep -E "^kiln|decode steps"); pack
  OUT=$R RUN_TAG=-new$i NUM_REQUESTS=512 EXTRA_ARGS="--load-format dummy" STAGE_TIMEOUT=80 bash benchmarks/gpu_suite.sh fp8:throughput-1k 2>&1 | grep -E "^kiln|decode steps"; pack
done
