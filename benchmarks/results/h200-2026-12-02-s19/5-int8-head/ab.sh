#!/usr/bin/env bash
# call 5: int4 layers with an int8 LM head (batch 1, dummy), beside int4 head / bf16 head
export PYTHONPATH=$PWD KILN_CACHE=/tmp/kiln-cache TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
R=$OUT/r; mkdir -p $R
run() { # name args...
  local name=$1; shift
  timeout 100 python3 -m kiln.cli bench latency --random-config llama-3.1-8b --max-seq-len 2048 \
    --load-format dummy --input-len 128 --output-len 256 --quantization int4_wo --group-size 128 "$@" --out $R/$name.json > $R/$name.log 2>&1
  python3 -c "import json; d=json.load(open('$R/$name.json')); k=d['kiln']; print('$name', round(k['output_tok_s'],1), round(k['tpot_ms'],3))" 2>&1 | tail -1
}
run int4head8-1 --quantize-lm-head int8_wo
run int4head4-1 --quantize-lm-head
run int4head8-2 --quantize-lm-head int8_wo
rm -f $R/*.png; cd $OUT && tar czf r.tgz r && rm -rf r
