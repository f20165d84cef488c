#!/usr/bin/env bash
# For the next device session (carry .whl: `pip download --no-deps -d .whl gguf`). Why does
# the TMA GEMV lose end to end at down (o + down 342 tok/s against 391, this session) when
# alone it takes 17.6 us against the pairs GEMV's 15.9? Batch 1 int4 g128 (128 / 256,
# --quantize-lm-head), alternating (~5 min):
#   - default; the TMA GEMV at down only; the same without its PDL launch
#     (KILN_INT4_GEMV_TMA_PDL=0) and with PDL off for the whole int4 path (KILN_INT_PDL=0);
#   - then a profile (trace_gaps --by-kernel) of the default and of down on the TMA GEMV.
# A guess to check: the early launch lets the TMA GEMV's programs (64 KB of ring each,
# copied before their wait) take SM slots and bandwidth while gate_up's last programs run.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
mkdir -p /tmp/site && pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:$PWD/benchmarks:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/0card.log"
run() {  # run TAG [ENV...]
  env "${@:2}" RUN_TAG=-$1 EXTRA_ARGS="--load-format dummy --quantize-lm-head" \
    STAGE_TIMEOUT=120 bash benchmarks/gpu_suite.sh int4:latency-b1 2>&1 \
    | grep -E "kiln |rror" | sed "s/^/[$1] /" | tee -a "$OUT/1down.log"
}
D="KILN_INT4_GEMV_TMA=1 KILN_INT4_GEMV_TMA_SHAPES=4096x14336"
for i in 1 2; do
  run base$i; run down$i $D; run down-nopdl$i $D KILN_INT4_GEMV_TMA_PDL=0
  run down-intpdl0-$i $D KILN_INT_PDL=0; run base-intpdl0-$i KILN_INT_PDL=0
done
for v in base down; do
  [ $v = down ] && set -- $D || set --
  env "$@" timeout 200 python3 -m kiln.cli bench latency --random-config llama-3.1-8b \
    --input-len 128 --output-len 256 --max-seq-len 2048 --quantization int4_wo \
    --group-size 128 --load-format dummy --quantize-lm-head --profile /tmp/prof-$v 2>&1 \
    | tail -3 > "$OUT/2prof-$v.log"
  timeout 120 python3 benchmarks/trace_gaps.py /tmp/prof-$v/trace.json --by-kernel --top 20 \
    >> "$OUT/2prof-$v.log" 2>&1; grep -A12 "^kernel" "$OUT/2prof-$v.log" | cut -c1-110
done
rm -f "$OUT"/*.json "$OUT"/*.png
