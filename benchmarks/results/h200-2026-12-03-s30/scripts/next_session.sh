#!/usr/bin/env bash
# For the next device session (written in the 30th, not run: its device time ran out): the GLU epilogue
# (act(gate) * up in the gate-up GEMV, KILN_SWAP_GLU=1): its GPU tests, then bf16 batch 1
# with it and without, alternating.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_gemv_swap.py \
  -k "glu" > $R/tests-glu.log 2>&1; tail -n 3 $R/tests-glu.log; pack
B="bench latency --random-config llama-3.1-8b --load-format dummy --max-seq-len 2048 \
  --input-len 128 --output-len 256"
for g in 1 0; do
  KILN_SWAP_GLU=$g timeout 45 python3 -m kiln.cli $B --out $R/b1-glu$g.json > $R/b1-glu$g.log 2>&1
  echo "b1 glu=$g"; grep -h "^kiln" $R/b1-glu$g.log; pack
done
