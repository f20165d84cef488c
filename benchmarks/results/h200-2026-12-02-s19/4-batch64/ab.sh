#!/usr/bin/env bash
# call 4: the pairs GPU test again (fixed comparison), then batch-64 int4 vs bf16 (dummy)
export PYTHONPATH=$PWD KILN_CACHE=/tmp/kiln-cache TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
R=$OUT/r; mkdir -p $R
timeout 150 python3 -m pytest -q -m gpu tests/test_kernels_int_pairs.py > $R/tests-pairs.log 2>&1; echo "exit $?" >> $R/tests-pairs.log
tail -3 $R/tests-pairs.log
run() { # name args...
  local name=$1; shift
  timeout 120 python3 -m kiln.cli bench throughput --random-config llama-3.1-8b --max-seq-len 2048 \
    --load-format dummy --input-len 512 --output-len 256 --num-requests 64 "$@" --out $R/$name.json > $R/$name.log 2>&1
  python3 -c "import json; d=json.load(open('$R/$name.json')); k=d['kiln']; print('$name', round(k['output_tok_s'],1))" 2>&1 | tail -1
}
run bf16-64
run int4-64 --quantization int4_wo --group-size 128
run int4head-64 --quantization int4_wo --group-size 128 --quantize-lm-head
rm -f $R/*.png; cd $OUT && tar czf r.tgz r && rm -rf r
