#!/usr/bin/env bash
# The 60th session's device calls (carry .whl: `pip download --no-deps -d .whl gguf`).
#  d (~5 min): the 59th session's next.sh (why the TMA GEMV loses end to end at down)
#  p (~7 min): the TMA GEMV's PDL at down and at gate_up, KILN_INT4_GEMV_TMA_PDL=1 / late /
#     wait / late-wait (call 1: down on the TMA GEMV 346 tok/s with PDL, 386 without, 394
#     on the pairs GEMV); its GPU dispatch test with late-wait first
#  f (~2 min): profiles (trace_gaps --by-launch: each kernel and grid's advance of the
#     timeline, PDL overlaps left out) of the default, down on the TMA GEMV, and the same late
#  h (~4 min, on an H200): the H200 numbers of BENCHMARKS.md's #10 rows with this tree's
#     defaults: b1 int4 g128 and g32, int4 and bf16 64 x 512 / 256 (the 58th's `call.sh h`)
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export KILN_CACHE=/tmp/kiln-cache PYTHONUNBUFFERED=1
mkdir -p /tmp/site && pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:$PWD/benchmarks:/tmp/site
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/0card.log")
echo "$card"
D="KILN_INT4_GEMV_TMA=1 KILN_INT4_GEMV_TMA_SHAPES=4096x14336"  # down on the TMA GEMV
G="KILN_INT4_GEMV_TMA=1 KILN_INT4_GEMV_TMA_SHAPES=28672x4096"  # gate_up on it
for stage in "$@"; do case $stage in
d) OUT=$OUT bash benchmarks/results/2026-12-07-s59/next.sh ;;
h) case $card in *H200*) OUT=$OUT bash benchmarks/results/2026-12-0*-s58/call.sh h ;;
   *) echo "h: not an H200, skipped" ;; esac ;;
p) timeout 80 env KILN_INT4_GEMV_TMA_PDL=late-wait python3 -m pytest -q -p no:cacheprovider \
     -m gpu tests/test_int4_gemv_tma.py -k dispatch 2>&1 | tail -3 \
     | tee "$OUT/1tests.log"
   run() {  # run TAG [ENV...] (SPEC: the gpu_suite stage, groups of 128 unless set)
     env "${@:2}" RUN_TAG=-$1 EXTRA_ARGS="--load-format dummy --quantize-lm-head" \
       STAGE_TIMEOUT=120 bash benchmarks/gpu_suite.sh ${SPEC:-int4:latency-b1} 2>&1 \
       | grep -E "kiln |rror" | sed "s/^/[$1] /" | tee -a "$OUT/2pdl.log"
   }
   # (in order of importance: a call cut short keeps the first)
   run base1; run down-late $D KILN_INT4_GEMV_TMA_PDL=late; run down-1 $D
   run gate_up-late $G KILN_INT4_GEMV_TMA_PDL=late; run gate_up-1 $G
   run base2; run down-late-2 $D KILN_INT4_GEMV_TMA_PDL=late
   run gate_up-late-2 $G KILN_INT4_GEMV_TMA_PDL=late
   run down-wait $D KILN_INT4_GEMV_TMA_PDL=wait
   SPEC=q4g32:latency-b1  # groups of 32 (every linear on the TMA GEMV): PDL as now and late
   run g32-1; run g32-late KILN_INT4_GEMV_TMA_PDL=late ;;
f) for v in base down down-late; do
     case $v in base) set -- ;; down) set -- $D ;; *) set -- $D KILN_INT4_GEMV_TMA_PDL=late ;; esac
     env "$@" timeout 200 python3 -m kiln.cli bench latency --random-config llama-3.1-8b \
       --input-len 128 --output-len 256 --max-seq-len 2048 --quantization int4_wo \
       --group-size 128 --load-format dummy --quantize-lm-head --profile /tmp/prof-$v 2>&1 \
       | tail -3 > "$OUT/3prof-$v.log"
     timeout 120 python3 benchmarks/trace_gaps.py /tmp/prof-$v/trace.json --by-launch --top 24 \
       >> "$OUT/3prof-$v.log" 2>&1; grep -A16 "^kernel" "$OUT/3prof-$v.log" | cut -c1-110
   done ;;
esac; done
