#!/usr/bin/env bash
# 41st session: chunks over a cached prefix through two cuDNN calls merged by their
# log-sum-exps (kiln/kernels/attention_sdpa.py). One device call, ~6 minutes.
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 KILN_CACHE=/tmp/kiln-cache
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
timeout 60 python3 - <<'PY' 2>&1 | grep -v Warning | tee $OUT/probe.log
import torch
q = torch.randn(1, 32, 777, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 8, 3000, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
ke, ve = (t.repeat_interleave(4, dim=1) for t in (k, v))
s = 128 ** -0.5
for causal in (False, True):
    kk, vv = (k[:, :, :777], v[:, :, :777]) if causal else (k, v)
    ke2, ve2 = (t.repeat_interleave(4, dim=1) for t in (kk, vv))
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), ke2.float(), ve2.float(), is_causal=causal, scale=s)
    sc = (q.float() @ ke2.float().transpose(-1, -2)) * s
    if causal:
        sc = sc.masked_fill(torch.ones(777, 777, device="cuda", dtype=torch.bool).triu(1), float("-inf"))
    lse_ref = sc.logsumexp(-1)
    for name, kx, vx in (("gqa", kk, vv), ("repeated", ke2, ve2)):
        try:
            o, l = torch.ops.aten._scaled_dot_product_cudnn_attention(q, kx, vx, None, True, 0.0, causal, False, scale=s)[:2]
            print(name, "causal" if causal else "full", "lse shape", tuple(l.shape), l.dtype,
                  "out diff", (o.float() - ref).abs().max().item(),
                  "lse diff", (l.reshape(1, 32, 777) - lse_ref).abs().max().item())
        except Exception as e:
            print(name, causal, "ERROR", type(e).__name__, str(e)[:300])
PY
timeout 240 python3 -m pytest -q -x -p no:cacheprovider \
  "tests/test_kernels_gpu.py::test_prefill_attention_sdpa" \
  "tests/test_gpu_engine.py::test_sdpa_prompt_attention_keeps_logits" > $OUT/tests.log 2>&1
tail -15 $OUT/tests.log; echo "tests t=$SECONDS"
timeout 120 python3 benchmarks/attn_prefill_sdpa.py $OUT/attn-chunks.json \
  --cases 8192@8192,8192@24576,2048@6000,1024@3000,512@2000,16384@16384 2>&1 \
  | grep -v "Warning\|return F" > $OUT/attn.log
grep "kiln\|flash op" $OUT/attn.log | grep -v "x of sdpa\|x of flash"; echo "bench t=$SECONDS"
for f in 0 1; do
  [ $SECONDS -gt 480 ] && break
  KILN_PREFILL_SDPA=$f timeout 100 python3 benchmarks/ttft.py --random-config llama-3.1-8b \
    --load-format dummy --max-seq-len 32768 --lengths 16000,32000 --variants 0 --repeats 3 \
    > $OUT/ttft-s$f.log 2>&1
  echo "sdpa=$f t=$SECONDS"; grep TTFT $OUT/ttft-s$f.log
done
