"""Probe: how fast can a Triton 3.6 causal attention kernel run on this card when K / V are
contiguous and read by TMA (tensor descriptors), against SDPA on the same shapes? Issue
#12 asks for prefill attention at >= 1.0x SDPA; kiln's paged kernel is at 0.67x (8k
tokens, H200). If even this kernel does not get there, no paged kernel in Triton will;
if it does, a fresh prompt (nothing cached before it) could attend over the step's own
K / V, as they leave the QKV projection, instead of the paged cache.

    python benchmarks/attn_prefill_tma.py OUT.json [--lengths 4096,8192] [--quick]

Shapes: one causal prompt, Llama-3.1-8B heads (32 query / 8 KV, d 128), bf16; q, k and v
are column slices of one fused [T, (32 + 2 * 8) * 128] QKV tensor, as the engine has them.
A program takes BLOCK_M query rows, of one query head or (pack_group) the (token, head)
pairs of one KV head's query heads, and walks the keys below its first row unmasked,
then its diagonal band masked; the last query tiles (the longest rows) start first. Each
launch is checked against SDPA's output before it is timed. With TRITON_INTERPRET=1 (or
--quick) it checks every launch's arithmetic on the CPU at a small shape, no timing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
LOG2E = 1.4426950408889634


@triton.jit
def _tile(q, acc, m_i, l_i, k_desc, v_desc, n0, kv_col, row_tok, qk_scale,
          BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Folds keys n0 .. n0 + BLOCK_N into (acc, m_i, l_i); MASK: causal (key <= the row's
    token, row_tok)."""
    k = k_desc.load([n0, kv_col])
    s = tl.dot(q, k.T) * qk_scale
    if MASK:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = tl.where(offs_n[None, :] <= row_tok[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = v_desc.load([n0, kv_col])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _causal_tma_kernel(q_desc, k_desc, v_desc, o_desc, tokens, qk_scale,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, PACK_GROUP: tl.constexpr):
    """PACK_GROUP: a tile's rows are (token, query head) pairs of the GROUP heads of one KV
    head (grid: query tiles x KV heads; each K / V tile read once for the group, as kiln's
    paged kernel does); else BLOCK_M tokens of one query head (grid: tiles x heads)."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest rows first
    if PACK_GROUP:
        kv_head = tl.program_id(1)
        TOKENS_M: tl.constexpr = BLOCK_M // GROUP
        t0 = pid_m * TOKENS_M
        q = q_desc.load([t0, kv_head * GROUP, 0]).reshape(BLOCK_M, HEAD_DIM)
    else:
        head = tl.program_id(1)
        kv_head = head // GROUP
        TOKENS_M: tl.constexpr = BLOCK_M
        t0 = pid_m * TOKENS_M
        q = q_desc.load([t0, head * HEAD_DIM])
    row_tok = t0 + tl.arange(0, BLOCK_M) // (BLOCK_M // TOKENS_M)
    kv_col = kv_head * HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_end = (t0 // BLOCK_N) * BLOCK_N  # keys every row of the tile sees
    for n0 in tl.range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _tile(q, acc, m_i, l_i, k_desc, v_desc, n0, kv_col, row_tok,
                              qk_scale, BLOCK_N, False)
    for n0 in tl.range(full_end, tl.minimum(t0 + TOKENS_M, tokens), BLOCK_N):  # the diagonal
        acc, m_i, l_i = _tile(q, acc, m_i, l_i, k_desc, v_desc, n0, kv_col, row_tok,
                              qk_scale, BLOCK_N, True)
    out = (acc / l_i[:, None]).to(o_desc.dtype)
    if PACK_GROUP:
        o_desc.store([t0, kv_head * GROUP, 0], out.reshape(TOKENS_M, GROUP, HEAD_DIM))
    else:
        o_desc.store([t0, head * HEAD_DIM], out)


def causal_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               block_m: int = 128, block_n: int = 64, num_warps: int = 8, num_stages: int = 2,
               pack_group: bool = False) -> torch.Tensor:
    """q [T, H, d], k / v [T, KVH, d] (rows may be strided, e.g. slices of a fused QKV
    output; unit last strides) -> out [T, H, d], causal."""
    tokens, heads, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    out = torch.empty(tokens, heads, d, dtype=q.dtype, device=q.device)

    def desc(t: torch.Tensor, rows: int) -> TensorDescriptor:
        assert t.stride(2) == 1 and t.stride(1) == d
        return TensorDescriptor(t, [tokens, t.shape[1] * d], [t.stride(0), 1], [rows, d])

    if pack_group:
        tokens_m = block_m // group
        q_desc, o_desc = (TensorDescriptor(t, list(t.shape), list(t.stride()),
                                           [tokens_m, group, d]) for t in (q, out))
        grid = (triton.cdiv(tokens, tokens_m), kv_heads)
    else:
        tokens_m = block_m
        q_desc, o_desc = desc(q, block_m), desc(out, block_m)
        grid = (triton.cdiv(tokens, block_m), heads)
    assert tokens_m % block_n == 0 or block_n % tokens_m == 0
    _causal_tma_kernel[grid](q_desc, desc(k, block_n), desc(v, block_n), o_desc, tokens,
                             scale * LOG2E, GROUP=group, HEAD_DIM=d, BLOCK_M=block_m,
                             BLOCK_N=block_n, PACK_GROUP=pack_group, num_warps=num_warps,
                             num_stages=num_stages)
    return out


# Triton 3.6's Hopper warp specialization (tl.range(..., warp_specialize=True)) was tried
# offline on this kernel (sm_90 compile): its pass fails at 4 warps and changes nothing at
# 8 (no register split, the same warps), so it is not among the launches.
LAUNCHES = [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st, pack_group=pg)
            for pg, bm, bn, w, st in itertools.product((False, True), (128, 256), (64, 128),
                                                       (4, 8), (2, 3))
            if not (bm == 256 and w == 4) and not (bm == 256 and not pg)]


def qkv_views(tokens: int, device: str, dtype: torch.dtype):
    """q, k, v as column slices of one fused QKV tensor, as the engine's projection gives."""
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=device, dtype=dtype)
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=1)
    return (q.view(tokens, HEADS, HEAD_DIM), k.view(tokens, KV_HEADS, HEAD_DIM),
            v.view(tokens, KV_HEADS, HEAD_DIM))


def sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                          v.transpose(0, 1), is_causal=True, scale=scale,
                                          enable_gqa=True).transpose(0, 1)


def quick(launches: list[dict] = LAUNCHES) -> None:
    """The launches' arithmetic in the interpreter (small shape, CPU)."""
    q, k, v = qkv_views(200, "cpu", torch.float32)  # not a whole tile
    want = sdpa(q, k, v, HEAD_DIM ** -0.5)
    for launch in launches:
        got = causal_tma(q, k, v, HEAD_DIM ** -0.5, **launch)
        err = (got - want).abs().max().item()
        print(f"{launch}: max |diff| {err:.2e}")
        assert err < 1e-3, launch
    # kiln's paged kernel over 64- / 128-token blocks, gathered and by TMA (float16 here:
    # the interpreter's bfloat16 is not exact)
    q16 = qkv_views(200, "cpu", torch.float16)[0]
    variants = paged_block_variants(200, q16, HEAD_DIM ** -0.5)
    assert len(variants) == 2 * sum(len(cache_kinds(*launch[:3])) for launch in PAGED_LAUNCHES)
    print(f"{len(variants)} paged launches agree with SDPA")


# kiln's paged kernel over 64- / 128-token KV blocks: the tiles gathered as with 16-token
# blocks, or read by TMA (KILN_PREFILL_TMA, kiln.kernels.paged_tma: one block holds a tile)
PAGED_LAUNCHES = [(64, 64, 4, 3), (64, 64, 8, 3), (64, 64, 8, 2), (128, 64, 4, 3),
                  (128, 128, 8, 3), (128, 128, 8, 2)]  # block size, keys a tile, warps, stages


def cache_kinds(bs: int, block_n: int, warps: int) -> tuple[str, ...]:
    """The caches a paged launch is timed on: 16-bit (q's dtype), e4m3 for two."""
    return ("16-bit", "e4m3") if (bs, block_n, warps) in ((64, 64, 4), (128, 128, 8)) \
        else ("16-bit",)


def paged_block_variants(n: int, q: torch.Tensor, scale: float) -> dict:
    """name -> call, each checked first against SDPA over the same K / V (caches of q's
    dtype; e4m3 for two launches, against SDPA over the e4m3 values)."""
    from kiln.kernels import paged_tma
    from kiln.kernels.attention_prefill import paged_attention_prefill

    out = {}
    dev = q.device
    k_all, v_all = (x.contiguous() for x in qkv_views(n, dev, q.dtype)[1:])
    for bs, block_n, warps, stages in PAGED_LAUNCHES:
        blocks = -(-n // bs)
        order = torch.randperm(blocks, device=dev).int()
        table = order[None, :]
        caches = []
        for x in (k_all, v_all):  # the prompt's K / V in shuffled blocks
            c = torch.zeros(blocks, bs, KV_HEADS, HEAD_DIM, device=dev, dtype=x.dtype)
            c.view(-1, KV_HEADS, HEAD_DIM)[(order.long()[:, None] * bs + torch.arange(
                bs, device=dev)).flatten()[:n]] = x
            caches.append(c)
        for kv in cache_kinds(bs, block_n, warps):
            kc, vc = caches
            extra = {}
            ref = sdpa(q, k_all, v_all, scale)
            if kv == "e4m3":
                kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
                one = torch.ones(KV_HEADS, device=dev)
                extra = dict(k_scale=one, v_scale=one)
                ref = sdpa(q, k_all.to(torch.float8_e4m3fn).to(q.dtype),
                           v_all.to(torch.float8_e4m3fn).to(q.dtype), scale)
            for tma in (False, True):
                name = (f"paged bs={bs} {'TMA' if tma else 'gather'} {kv} block_n={block_n} "
                        f"num_warps={warps} num_stages={stages}")
                run = partial(paged_attention_prefill, q, kc, vc, table,
                              torch.tensor([0, n], dtype=torch.int32, device=dev),
                              torch.tensor([n], dtype=torch.int32, device=dev), n, scale,
                              block_n=block_n, num_warps=warps, num_stages=stages,
                              heavy_first=True, **extra)

                def call(run=run, tma=tma):
                    paged_tma.ENABLED = tma
                    try:
                        return run()
                    finally:
                        paged_tma.ENABLED = False
                try:
                    err = (call().float() - ref.float()).abs().max().item()
                except Exception as e:  # shared memory, registers
                    print(f"{n} {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                if err > 0.05:
                    print(f"{n} {name}: differs from SDPA by {err:.3f}; not timed", flush=True)
                    continue
                out[name] = call
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick or os.environ.get("TRITON_INTERPRET") == "1":
        quick()
        return
    from triton.testing import do_bench

    from kiln.kernels.attention_prefill import paged_attention_prefill
    from kiln.kernels.bench import _paged

    scale = HEAD_DIM ** -0.5
    results = []
    for n in (int(x) for x in args.lengths.split(",")):
        flops = 4 * n * (n + 1) / 2 * HEADS * HEAD_DIM
        q, k, v = qkv_views(n, "cuda", torch.bfloat16)
        want = sdpa(q, k, v, scale)
        # SDPA on contiguous [1, heads, n, d] copies: on the views above (slices of one QKV
        # tensor) it took its math backend, 9-10 TFLOP/s (24th session), not flash / cuDNN
        q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
        timed = {"sdpa": partial(F.scaled_dot_product_attention, q4, k4, v4, is_causal=True,
                                 scale=scale, enable_gqa=True)}
        pq, k_cache, v_cache, tables, starts = _paged([n], [n])
        qsl = torch.tensor(starts, dtype=torch.int32, device="cuda")
        lens = torch.tensor([n], dtype=torch.int32, device="cuda")
        timed["kiln paged"] = partial(paged_attention_prefill, pq, k_cache, v_cache, tables,
                                      qsl, lens, n, scale)
        timed.update(paged_block_variants(n, q, scale))
        for launch in LAUNCHES:
            name = "tma " + " ".join(f"{key}={val}" for key, val in launch.items())
            try:
                err = (causal_tma(q, k, v, scale, **launch).float() - want.float()).abs().max()
            except Exception as e:  # shared memory, registers, a pass that refuses
                print(f"{n} {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            if err.item() > 0.05:
                print(f"{n} {name}: differs from SDPA by {err.item():.3f}; not timed", flush=True)
                continue
            timed[name] = partial(causal_tma, q, k, v, scale, **launch)
        sdpa_ms = None
        rows = []
        for name, fn in timed.items():
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            sdpa_ms = sdpa_ms or ms
            rows.append(dict(tokens=n, kernel=name, ms=ms, tflops=flops / ms / 1e9,
                             vs_sdpa=sdpa_ms / ms))
        rows.sort(key=lambda r: r["ms"])
        for r in rows[:8] + [r for r in rows[8:] if not r["kernel"].startswith("tma")]:
            print(f"{n:6d} {r['kernel']:75s} {r['ms']:8.4f} ms {r['tflops']:5.0f} TFLOP/s "
                  f"{r['vs_sdpa']:.2f}x SDPA", flush=True)
        results += rows
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
