#!/usr/bin/env bash
# For the next device session (one H200), from the repository root:
#   bash benchmarks/results/h200-2026-12-02-s23/scripts/next_session.sh   (~3 minutes)
# Whether a Triton 3.6 causal attention kernel reading contiguous K / V by TMA (tensor
# descriptors) reaches SDPA at 4k / 8k tokens (issue #12: kiln's paged kernel is at 0.67x
# at 8k): benchmarks/attn_prefill_tma.py, 20 launches (one query head a tile or the
# (token, head) pairs of a KV head's group; 64 / 128 keys; 4 / 8 warps; 2 / 3 stages)
# against SDPA and kiln's paged kernel, each checked against SDPA's output first.
# If one reaches ~1.0x: a fresh prompt's attention (nothing cached before it) could read
# the step's own K / V as they leave the QKV projection; if none does, the target is past
# what Triton's kernels reach on this card without warp specialization (the sm_90 compile
# of tl.range(warp_specialize=True) fails at 4 warps and is a no-op at 8).
set -u
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
R=/tmp/r; mkdir -p $R; OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/r.tgz" -C /tmp r; }
timeout 240 python3 benchmarks/attn_prefill_tma.py $R/attn_tma.json --lengths 1024,4096,8192 \
  > $R/attn_tma.log 2>&1
grep -v Warn $R/attn_tma.log | tail -40; pack
# Decode attention over an e4m3 cache with V stored transposed inside each block (a
# prototype kernel; kiln's cache layout is unchanged): against kiln's e4m3 decode at
# 512 x 1536, 496 x 256 / 192, 256 x 1024, 64 x 8192 (one split each). The main loop
# compiles to 626 instructions a 64-key tile against kiln's 1,179 (sm_90, offline).
timeout 200 python3 benchmarks/attn_decode_vt.py $R/attn_vt.json > $R/attn_vt.log 2>&1
grep -v Warn $R/attn_vt.log | tail -30; pack
