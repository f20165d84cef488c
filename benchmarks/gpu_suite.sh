#!/usr/bin/env bash
# Everything kiln checks and measures on a GPU, in one device call.
#   bash benchmarks/gpu_suite.sh [tests] [kernels] [latency] [throughput] [hf] [serving]
# A stage prefixed "fp8:" runs with FP8 weights and an FP8 KV cache (e.g. fp8:latency-b1),
# "fp8w:" with FP8 weights only, "kv8:" with an FP8 KV cache only, "tp2:" on two GPUs
# ("tp2nccl:" the same with NCCL for every all-reduce, "fp8tp2:" FP8 on two GPUs, "pp2:"
# two pipeline stages), NUM_REQUESTS the request count of throughput-1k (default 1000),
# "int4:" with INT4 weights (RTN, groups of 128), "int8w:" with INT8 weights (per channel),
# "q4g32:" / "q8g32:" INT4 / INT8 weights in groups of 32 (GGUF Q4_0-Q4_1 / Q8_0's layouts),
# "sq8:" SmoothQuant W8A8 with an INT8 KV cache (calibrated on kiln's shipped text),
# "sinks:" attention sinks (4 sinks, a 1024-token window). EXTRA_ARGS adds flags to the
# kiln bench stages (latency*, ttft, throughput*; not build8b or the -hf ones), RUN_TAG a
# suffix to their result files (A/B runs of one stage), MODEL
# another random-weight preset than llama-3.1-8b (e.g. MODEL=gemma-2-9b, mixtral-8x7b:
# 93 GB of bf16 weights, so KILN_CACHE on a disk that holds them: nvidia-h200-x2; or
# EXTRA_ARGS="--load-format dummy": nothing stored, each rank draws its weights on its GPU,
# the way to run llama-3.1-70b / llama-3.1-405b; not with the -hf stages).
# Results (logs, JSON, PNG) go to $OUT (or ./gpu-out); PACK=NAME packs them into one
# NAME.tgz at the end. Runs from the repository root.
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
# The device image has had no `gguf` since the 44th session: wheels in .whl/ (pip download
# gguf there, carry .whl) are installed beside it for the tests that read GGUF files.
if [ -d .whl ] && ! python3 -c "import gguf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} KILN_CACHE=${KILN_CACHE:-/tmp/kiln-cache} TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 TQDM_DISABLE=1
stages=${*:-tests kernels latency throughput}
T="timeout ${STAGE_TIMEOUT:-300}"  # a hung stage (NCCL teardown) must not eat the run
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
for spec in $stages; do
  echo "=== $spec"; start=$(date +%s)
  tag=""; stage=$spec
  Q="--max-seq-len 2048 ${EXTRA_ARGS:-}"  # EXTRA_ARGS: more build/bench flags for every stage
  case $spec in
    fp8:*) Q="$Q --quantization fp8 --kv-cache-dtype fp8"; tag="-fp8"; stage=${spec#fp8:} ;;
    fp8w:*) Q="$Q --quantization fp8"; tag="-fp8w"; stage=${spec#fp8w:} ;;
    kv8:*) Q="$Q --kv-cache-dtype fp8"; tag="-kv8"; stage=${spec#kv8:} ;;
    tp2:*) Q="$Q --tp-size 2"; tag="-tp2"; stage=${spec#tp2:} ;;
    int4:*) Q="$Q --quantization int4_wo --group-size 128"; tag="-int4"; stage=${spec#int4:} ;;
    int8w:*) Q="$Q --quantization int8_wo"; tag="-int8w"; stage=${spec#int8w:} ;;
    q4g32:*) Q="$Q --quantization int4_wo --group-size 32"; tag="-q4g32"; stage=${spec#q4g32:} ;;  # GGUF Q4_0 / Q4_1's layout
    q8g32:*) Q="$Q --quantization int8_wo --group-size 32"; tag="-q8g32"; stage=${spec#q8g32:} ;;  # GGUF Q8_0's layout
    sq8:*) Q="$Q --quantization int8_sq --kv-cache-dtype int8"; tag="-sq8"; stage=${spec#sq8:} ;;
    pp2:*) Q="$Q --pp-size 2"; tag="-pp2"; stage=${spec#pp2:} ;;
    tp2nccl:*) Q="$Q --tp-size 2 --no-custom-all-reduce"; tag="-tp2nccl"; stage=${spec#tp2nccl:} ;;
    fp8tp2:*) Q="$Q --quantization fp8 --kv-cache-dtype fp8 --tp-size 2"; tag="-fp8tp2"; stage=${spec#fp8tp2:} ;;
    sinks:*) Q="$Q --attention-sinks 4 --attention-window 1024"; tag="-sinks"; stage=${spec#sinks:} ;;
    allreduce) $T python3 benchmarks/allreduce_bench.py "$OUT/allreduce.json" 2>&1 | tail -8; continue ;;
  esac
  tag="$tag${RUN_TAG:-}${MODEL:+-$MODEL}"  # suffixes for repeated variants, other models
  case $stage in
    tests) # four groups at once (spread over the GPUs, the parallel tests on two), a log each,
           # so a hang in one group does not hide the others' results
           G="${STAGE_TIMEOUT:-420}"
           run_group() { local name=$1 gpus=$2; shift 2
             CUDA_VISIBLE_DEVICES=$gpus timeout "$G" python3 -m pytest -q -m gpu -p no:cacheprovider \
               -rf --tb=short "$@" > "$OUT/tests-$name.log" 2>&1; echo "exit $?" >> "$OUT/tests-$name.log"; }
           n=$(nvidia-smi -L | wc -l); b=$(( n > 1 ? 1 : 0 ))
           # (the engine tests alone take ~190-250 s on an H200, each engine loaded runs the
           # warm-up: a group of their own since the 25th session, when group a ran past 330 s)
           run_group a 0 tests/test_kernels_gpu.py tests/test_bench_roofline.py tests/test_gemv_swap.py \
             tests/test_gemv_swap_epilogues.py &
           run_group e 0 tests/test_gpu_engine.py &
           run_group c $b tests/test_kernels_fp8.py tests/test_kernels_kvquant.py tests/test_fp8_mid.py &
           run_group b $b tests/test_kernels_gpu_zoo.py tests/test_kernels_int.py tests/test_int4_glu.py tests/test_int4_rope.py \
             tests/test_kernels_int8_act.py tests/test_weight_only.py tests/test_gpu_speculative.py tests/test_gguf_kept.py &
           [ "$n" -gt 1 ] && run_group parallel 0,1 tests/test_gpu_parallel.py &
           wait
           for f in "$OUT"/tests-*.log; do echo "--- $f"; grep -E "passed|failed|FAILED|Error|exit" "$f" | tail -15; done ;;
    latency-b1) $T python3 -m kiln.cli bench latency --random-config ${MODEL:-llama-3.1-8b} --input-len 128 \
             --output-len 256 $Q --out "$OUT/latency-b1$tag.json" 2>&1 | tail -8 ;;
    ttft) $T python3 -m kiln.cli bench latency --random-config ${MODEL:-llama-3.1-8b} --input-len 1000 \
             --output-len 16 --num-requests 1 $Q --out "$OUT/ttft$tag.json" 2>&1 | tail -8 ;;
    ttft-ab) # lone prompts' TTFT (128 / 1000 / 2000 tokens, 5 each), prefill from CUDA
             # graphs against eager, one engine after the other (benchmarks/ttft.py)
             $T python3 benchmarks/ttft.py --random-config ${MODEL:-llama-3.1-8b} $Q \
             --out "$OUT/ttft-ab$tag.json" 2>&1 | tail -8 ;;
    ttft-load) # a prompt's TTFT while 16 others decode (mixed steps): eager mixed steps
             # against the opt-in piecewise graphs
             $T python3 benchmarks/ttft.py --random-config ${MODEL:-llama-3.1-8b} $Q \
             --background 16 --lengths 128,1000 --variants 2048,pw2048 \
             --out "$OUT/ttft-load$tag.json" 2>&1 | tail -6 ;;
    ttft-prof) # where a 1000-token prompt's first token goes: host phases (kiln.prepare /
             # forward / sample) against the kernels' device time, and the gaps between them
             $T python3 -m kiln.cli bench latency --random-config ${MODEL:-llama-3.1-8b} --input-len 1000 \
             --output-len 2 --num-requests 1 $Q --profile /tmp/ttftprof$tag \
             --out "$OUT/ttft-prof$tag.json" > "$OUT/ttft-prof$tag.log" 2>&1
             grep -v "^$" "$OUT/ttft-prof$tag.log" | tail -44
             python3 benchmarks/trace_gaps.py /tmp/ttftprof$tag/trace.json --out "$OUT/ttft-gaps$tag.json" ;;
    long-ctx) # issue 12's long context: batch-1 decode at a 32k-token context against the
             # roofline counting KV bytes, and the 32k prompt's TTFT beside transformers (SDPA)
             $T python3 -m kiln.cli bench latency --random-config ${MODEL:-llama-3.1-8b} --input-len 32000 \
             --output-len 128 --num-requests 1 --compare-hf $Q --max-seq-len 32768 \
             --out "$OUT/long-ctx$tag.json" 2>&1 | tail -10 ;;
    int-gemv) # W4A16 / W8A16 one-row GEMMs at the 8B shapes: the GEMV over its launch grid
             # (with and without prefetch, factored scales, vector x), vs bf16 cuBLAS
             $T python3 benchmarks/int_gemv_bench.py "$OUT/int_gemv.json" > "$OUT/int_gemv.log" 2>&1
             tail -12 "$OUT/int_gemv.log" ;;
    int-batch) # W4A16 / W8A16 tl.dot tiles at 16 and 64 rows (decode batches, issue #10's
             # 64-request row) over launches incl. K splits and even/odd-k int4 products
             $T python3 benchmarks/int_batch_bench.py "$OUT/int_batch.json" > "$OUT/int_batch.log" 2>&1
             tail -6 "$OUT/int_batch.log"
             # one chart of both sweeps (the int-gemv one when it ran first)
             python3 benchmarks/plot_int.py $(ls "$OUT"/int_gemv.json "$OUT"/int_batch.json 2>/dev/null) \
               --out "$OUT/int_kernels.png" ;;
    int-pairs) # int4 with bfloat16 x in bfloat16 pairs (kiln.kernels.int_gemv_pairs): one row
             # over its launches (pipelined, one K split, 8 warps), and 2 / 4 rows against
             # the magic tiles kiln uses there
             $T python3 benchmarks/int_gemv_bench.py "$OUT/int_pairs.json" --pairs > "$OUT/int_pairs.log" 2>&1
             grep -A12 "best per" "$OUT/int_pairs.log"
             $T python3 benchmarks/int_batch_bench.py "$OUT/int_pairs_rows.json" --rows 2,4 --bits 4 \
               --magic > "$OUT/int_pairs_rows.log" 2>&1; tail -4 "$OUT/int_pairs_rows.log" ;;
    int8-gemv) # W8A8 (int8_sq) products of 1 / 4 / 16 rows: torch._int_mm padded to 17 rows
             # against the dp4a kernel (KILN_INT8_GEMV=1) over its launches, vs bf16 cuBLAS
             $T python3 benchmarks/int8_gemv_bench.py "$OUT/int8_gemv.json" > "$OUT/int8_gemv.log" 2>&1
             tail -4 "$OUT/int8_gemv.log" ;;
    ncu-int) # Nsight Compute (seen working on the device's Firecracker machines) on one call
             # of kiln's int4 / int8 linears and bf16 cuBLAS at gate_up, 1 and 64 rows: time,
             # DRAM throughput, instructions, occupancy and the warp stalls per issued
             # instruction, i.e. whether issue, memory latency or occupancy bounds it
             # (benchmarks/ncu_linear.py; the whole reports in $OUT)
             M="smsp__inst_executed.sum,dram__bytes_read.sum"
             for r in long_scoreboard short_scoreboard wait not_selected math_pipe_throttle \
                      barrier mio_throttle lg_throttle no_instruction; do
               M="$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"; done
             # NCU_VARIANTS: which (kind:rows[:shape]), e.g. "int4:1 int4:1:down"
             for v in ${NCU_VARIANTS:-bf16:1 int4:1 int8:1 bf16:64 int4:64 int8:64}; do
               v=${v//:/ }; f="$OUT/ncu-${v// /-}$tag.txt"
               $T ncu --clock-control none --profile-from-start off --kernel-name-base function \
                 -k 'regex:^(_|nvjet|sm90|cutlass)' --section SpeedOfLight --section Occupancy \
                 --section LaunchStats --section WarpStateStats --section SchedulerStats \
                 --metrics "$M" python3 benchmarks/ncu_linear.py $v > "$f" 2>&1
               echo "--- $v"; grep -E "^  [_a-z]|Duration|DRAM Throughput|Achieved Occupancy|No Eligible|inst_executed.sum|stalled_(long_scoreboard|wait|not_selected)" \
                 "$f" | sed 's/  */ /g; s/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//'
             done ;;
    attn-decode-sweep) # decode attention launches per cache dtype (B=512 x 1536, 256 x 1024,
             # 64 x 8192, 1 x 1024); SWEEP_MAXNREG=0,168,128 adds register caps for 1-byte caches
             $T python3 benchmarks/attn_decode_sweep.py "$OUT/attn_decode_sweep$tag.json" \
             > "$OUT/attn_decode_sweep$tag.log" 2>&1; grep "^B=" "$OUT/attn_decode_sweep$tag.log" ;;
    attn-prefill-sweep) # issue 12's prefill attention: launches (tiles, stages, warps,
             # tile order) at 4k / 8k / 16k causal, bf16 and fp8 caches, vs SDPA
             $T python3 benchmarks/attn_prefill_sweep.py "$OUT/attn_prefill_sweep.json" \
             > "$OUT/attn_prefill_sweep.log" 2>&1; grep -v "^  .*Error" "$OUT/attn_prefill_sweep.log" | tail -40 ;;
    kernels) $T python3 -m kiln.kernels.bench "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1; tail -30 "$OUT/kernels.log" ;;
    build8b) $T python3 -m kiln.cli build --random-weights --config ${MODEL:-llama-3.1-8b} \
             -o /tmp/kiln-8b --max-seq-len 4096 --max-batch-size 256 2>&1 | tail -3 ;;
    serving) # needs build8b; kiln serve, then tritonserver+kiln if $KILN_TRITON_ENV is a
             # venv with nvidia-pytriton and numpy<2 (docs/serving.md); same sweep on both
             B="python3 -m kiln.cli bench serving --concurrency 1,16,64,256 --num-prompts 16,128,256,512 \
                --input-len 128 --output-len 128"
             # SERVE_ARGS: more `kiln serve` flags (A/B: SERVE_ARGS=--engine-in-process RUN_TAG=-inproc);
             # SKIP_INFLIGHT=1: no triton_inflight.py after the sweeps
             python3 -m kiln.cli serve /tmp/kiln-8b --port 8100 ${SERVE_ARGS:-} > "$OUT/serve${RUN_TAG:-}.log" 2>&1 & S=$!
             for _ in $(seq 300); do curl -sf localhost:8100/health >/dev/null && break
               kill -0 $S 2>/dev/null || { tail -3 "$OUT/serve${RUN_TAG:-}.log"; break; }; sleep 1; done
             $T $B --url http://127.0.0.1:8100 --out "$OUT/serving-kiln${RUN_TAG:-}.json" 2>&1 | tail -8
             kill $S; wait $S
             if [ -x "${KILN_TRITON_ENV:-/nonexistent}/bin/python" ]; then
               python3 -m kiln.cli triton-repo /tmp/kiln-8b -o /tmp/kiln-8b-repo --device cuda
               python3 -m kiln.cli triton-serve /tmp/kiln-8b-repo --http-port 8200 \
                 --grpc-port 8201 --metrics-port 8202 > "$OUT/triton.log" 2>&1 & S=$!
               for _ in $(seq 300); do curl -sf localhost:8200/v2/health/ready >/dev/null && break
                 kill -0 $S 2>/dev/null || { tail -3 "$OUT/triton.log"; break; }; sleep 1; done
               $T $B --api triton --url http://127.0.0.1:8200 --out "$OUT/serving-triton.json" 2>&1 | tail -8
               kill $S; wait $S
               [ -n "${SKIP_INFLIGHT:-}" ] || $T python3 benchmarks/triton_inflight.py --triton-env "$KILN_TRITON_ENV" \
                 --engine /tmp/kiln-8b --device cuda --max-tokens 128 \
                 --out "$OUT/triton-inflight.json" 2>&1 | tail -5
             else echo "no KILN_TRITON_ENV: Triton half skipped"; fi ;;
    profile) python3 benchmarks/profile_decode.py /tmp/kiln-8b --batch 64 2>&1 | tail -34 ;;
    latency) $T python3 -m kiln.cli bench latency --random-config ${MODEL:-llama-3.1-8b} --input-len 1000 \
             --output-len 256 $Q --out "$OUT/latency$tag.json" 2>&1 | tail -12 ;;
    latency-hf) $T python3 -m kiln.cli bench latency --random-config ${MODEL:-llama-3.1-8b} --input-len 1000 \
             --output-len 128 --compare-hf --kv-fraction 0.5 --out "$OUT/latency-hf$tag.json" 2>&1 | tail -12 ;;
    throughput) $T python3 -m kiln.cli bench throughput --random-config ${MODEL:-llama-3.1-8b} --input-len 128 \
             --output-len 128 --num-requests 1000 $Q --out "$OUT/tput-128$tag.json" 2>&1 | tail -8 ;;
    proftput) # the 128/128 run under torch.profiler: step phases and the kernels by GPU time
             $T python3 -m kiln.cli bench throughput --random-config ${MODEL:-llama-3.1-8b} --input-len 128 \
             --output-len 128 --num-requests 1000 $Q --profile /tmp/prof$tag \
             --out "$OUT/proftput$tag.json" > "$OUT/proftput$tag.log" 2>&1
             grep -v "^$" "$OUT/proftput$tag.log" | tail -48
             python3 benchmarks/trace_gaps.py /tmp/prof$tag/trace.json --out "$OUT/gaps$tag.json"
             [ -n "${KEEP_TRACE:-}" ] && gzip -c /tmp/prof$tag/trace.json > "$OUT/trace$tag.json.gz" ;;
    throughput-64) $T python3 -m kiln.cli bench throughput --random-config ${MODEL:-llama-3.1-8b} \
             --input-len 512 --output-len 256 --num-requests 64 $Q --out "$OUT/tput-64$tag.json" 2>&1 | tail -8 ;;
    throughput-few) # a few requests at once (NUM_REQUESTS, default 4): decode at 2-4 rows
             $T python3 -m kiln.cli bench throughput --random-config ${MODEL:-llama-3.1-8b} \
             --input-len 128 --output-len 256 --num-requests ${NUM_REQUESTS:-4} $Q \
             --out "$OUT/tput-few${NUM_REQUESTS:-4}$tag.json" 2>&1 | tail -8 ;;
    throughput-1k) $T python3 -m kiln.cli bench throughput --random-config ${MODEL:-llama-3.1-8b} \
             --input-len 1000 --output-len 1000 --num-requests ${NUM_REQUESTS:-1000} $Q --out "$OUT/tput-1k$tag.json" 2>&1 | tail -8 ;;
    throughput-1k-noevict) $T python3 -m kiln.cli bench throughput --random-config ${MODEL:-llama-3.1-8b} \
             --input-len 1000 --output-len 1000 --num-requests 1000 $Q \
             --scheduler-policy guaranteed_no_evict --out "$OUT/tput-1k-noevict$tag.json" 2>&1 | tail -8 ;;
    throughput-hf) $T python3 -m kiln.cli bench throughput --random-config ${MODEL:-llama-3.1-8b} --input-len 128 \
             --output-len 128 --num-requests 64 --compare-hf --kv-fraction 0.5 \
             --out "$OUT/tput-hf$tag.json" 2>&1 | tail -8 ;;
    spec-ngram) $T python3 benchmarks/speculative.py ngram --out "$OUT/spec-ngram.json" 2>&1 | tail -14 ;;
    spec-overhead) STAGE_TIMEOUT=600 timeout 600 python3 benchmarks/speculative.py overhead \
             --out "$OUT/spec-overhead.json" 2>&1 | tail -40 ;;
    *) echo "unknown stage $stage" ;;
  esac
  echo "=== $spec took $(( $(date +%s) - start )) s"
done
# PACK=NAME: everything under $OUT into one $OUT/NAME.tgz (the device tool brings back at
# most 8 files a call; several stages or repeated runs write more)
if [ -n "${PACK:-}" ]; then
  tar czf "/tmp/$PACK.tgz" -C "$OUT" --exclude="*.tgz" . && find "$OUT" -type f ! -name "*.tgz" -delete \
    && mv "/tmp/$PACK.tgz" "$OUT/" && echo "packed into $OUT/$PACK.tgz"
fi
