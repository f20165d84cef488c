"""Prototype: decode attention over an e4m3 KV cache whose V blocks are stored transposed
([blocks, KV heads, d, block_size], tokens fastest), against kiln's decode kernel over the
usual [blocks, block_size, KV heads, d] layout.

Why: kiln's e4m3 decode reads its cache at ~3.4 TB/s where a bf16 cache reaches 4.3, and
the compiled main loop says where the difference goes (sm_90, kiln's e4m3 launch, per
64-key tile and thread): K reaches the MMA by 8 ldmatrix loads and 64 conversions (its
reduction dim, d, is contiguous in the cache), but V, reduced over tokens that are 128
bytes apart, by 128 single-byte shared-memory loads (LDS.U8) and their addressing: 1,179
instructions a tile against 634 for a bf16 cache. Stored with tokens fastest inside each
block, V's reduction dim is contiguous too, as K's is; read as [blocks, d, block_size]
(each row 16 contiguous bytes) and laid out as [d, keys], the tile reaches the MMA by
ldmatrix: 626 instructions a tile (`--sass`), 207 registers, no spills. This measures
what that would gain before any cache layout changes (the write kernel, the prefill and
mixed kernels, the CPU reference and the KV transfer all read V as laid out today).

    python benchmarks/attn_decode_vt.py OUT.json [--shapes 512x1536,496x256,64x8192]
    python benchmarks/attn_decode_vt.py --sass     (no GPU: main-loop SASS counts, sm_90)

One split a sequence (the shapes are chosen so that kiln's launcher picks one split too),
Llama-3.1-8B heads (32 / 8, d 128), 16-token blocks; each output is checked against kiln's
first. With TRITON_INTERPRET=1 (or --quick) only the arithmetic is checked, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial

import torch
import triton
import triton.language as tl

from kiln.kernels.attention_decode import decode_config, paged_attention_decode
from kiln.kernels.paged import kv_block_ids

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


@triton.jit
def _vt_tile(q, acc, m_i, l_i, k_cache_ptr, vt_cache_ptr, blocks, n0, n_end, kv_head,
             qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vh,
             BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
             MASK: tl.constexpr, table_row=None):
    """blocks: the tile's block per key ([BLOCK_N]); for V^T the tile's blocks are read
    again from table_row as one id a block (a [blocks, d, block_size] load whose rows are
    contiguous, then laid out as [d, BLOCK_N])."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    slot = offs_n % BLOCK_SIZE
    k_off = blocks.to(tl.int64) * stride_kb + slot * stride_ks + kv_head * stride_kh
    NB: tl.constexpr = BLOCK_N // BLOCK_SIZE
    offs_b = tl.arange(0, NB)
    vblk = tl.load(table_row + n0 // BLOCK_SIZE + offs_b,
                   mask=n0 + offs_b * BLOCK_SIZE < n_end, other=0)
    vt_off = (vblk.to(tl.int64)[:, None, None] * stride_vb + kv_head * stride_vh
              + offs_d[None, :, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, None, :])
    if MASK:
        n_ok = offs_n < n_end
        kt = tl.load(k_cache_ptr + k_off[None, :] + offs_d[:, None], mask=n_ok[None, :],
                     other=0.0)
        v3 = tl.load(vt_cache_ptr + vt_off,
                     mask=tl.reshape(n_ok, [NB, 1, BLOCK_SIZE]), other=0.0)
    else:
        kt = tl.load(k_cache_ptr + k_off[None, :] + offs_d[:, None])
        v3 = tl.load(vt_cache_ptr + vt_off)
    vt = tl.reshape(tl.permute(v3, (1, 0, 2)), [HEAD_DIM, BLOCK_N])
    s = tl.dot(q, kt.to(q.dtype)) * qk_scale
    if MASK:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), tl.trans(vt.to(q.dtype)))
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["stride_bt"])
def _vt_decode_kernel(q_ptr, k_cache_ptr, vt_cache_ptr, out_ptr, block_tables_ptr,
                      seq_lens_ptr, qk_scale, k_scale_ptr, v_scale_ptr, stride_qt, stride_qh,
                      stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_vb,
                      stride_vh, stride_bt, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                      PREFETCH: tl.constexpr):
    """One (sequence, KV head) over the whole context, as kiln's _decode_kernel with one
    split and an e4m3 cache (hardware conversion to float16, scales folded in), V read from
    the transposed blocks."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + offs_g
    g_ok = (offs_g < GROUP)[:, None]
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :], mask=g_ok, other=0.0).to(tl.float16)
    qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    full_end = (seq_len // BLOCK_N) * BLOCK_N
    offs_t = tl.arange(0, BLOCK_N)
    blocks = kv_block_ids(table_row, offs_t, seq_len, BLOCK_SIZE, True)
    for n0 in range(0, full_end, BLOCK_N):
        if PREFETCH:
            after = kv_block_ids(table_row, n0 + BLOCK_N + offs_t, seq_len, BLOCK_SIZE, True)
        else:
            blocks = kv_block_ids(table_row, n0 + offs_t, seq_len, BLOCK_SIZE, False)
        acc, m_i, l_i = _vt_tile(q, acc, m_i, l_i, k_cache_ptr, vt_cache_ptr, blocks, n0,
                                 seq_len, kv_head, qk_scale, stride_kb, stride_ks, stride_kh,
                                 stride_vb, stride_vh, BLOCK_N, HEAD_DIM, BLOCK_SIZE, False,
                                 table_row)
        if PREFETCH:
            blocks = after
    if full_end < seq_len:
        blocks = kv_block_ids(table_row, full_end + offs_t, seq_len, BLOCK_SIZE, True)
        acc, m_i, l_i = _vt_tile(q, acc, m_i, l_i, k_cache_ptr, vt_cache_ptr, blocks,
                                 full_end, seq_len, kv_head, qk_scale, stride_kb, stride_ks,
                                 stride_kh, stride_vb, stride_vh, BLOCK_N, HEAD_DIM,
                                 BLOCK_SIZE, True, table_row)
    out = acc / l_i[:, None] * tl.load(v_scale_ptr + kv_head)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head[:, None] * stride_oh
             + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=g_ok)


def decode_vt(q, k_cache, vt_cache, block_tables, seq_lens, scale, k_scale, v_scale,
              block_n=64, num_stages=3, num_warps=2, prefetch=1):
    """q [B, heads, d]; k_cache [blocks, block_size, kv_heads, d] e4m3; vt_cache
    [blocks, kv_heads, d, block_size] e4m3 -> out [B, heads, d]."""
    num_seqs, num_heads, d = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // kv_heads
    out = torch.empty_like(q)
    _vt_decode_kernel[(num_seqs, kv_heads)](
        q, k_cache, vt_cache, out, block_tables, seq_lens, scale * 1.4426950408889634,
        k_scale, v_scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), vt_cache.stride(0),
        vt_cache.stride(1), block_tables.stride(0), GROUP=group, HEAD_DIM=d,
        BLOCK_SIZE=block_size, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n, PREFETCH=prefetch, num_warps=num_warps, num_stages=num_stages)
    return out


def make_case(batch: int, ctx: int, device: str, dtype: torch.dtype):
    """q, e4m3 K / V caches (V also transposed), tables, lengths, per-head scales."""
    per_seq = -(-ctx // BLOCK_SIZE)
    num_blocks = batch * per_seq + 1
    k = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=device)
    v = torch.randn_like(k)
    k_scale = (k.abs().amax(dim=(0, 1, 3)) / 448).contiguous()
    v_scale = (v.abs().amax(dim=(0, 1, 3)) / 448).contiguous()
    k8 = (k / k_scale[:, None]).to(torch.float8_e4m3fn)
    v8 = (v / v_scale[:, None]).to(torch.float8_e4m3fn)
    vt8 = v8.permute(0, 2, 3, 1).contiguous()
    tables = torch.randperm(num_blocks - 1, device=device)[:batch * per_seq].int().view(
        batch, per_seq)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=dtype)
    return q, k8, v8, vt8, tables, lens, k_scale, v_scale


def quick() -> None:
    scale = HEAD_DIM ** -0.5
    for batch, ctx in ((3, 100), (2, 64), (1, 17)):  # tails, whole tiles, one partial tile
        q, k8, v8, vt8, tables, lens, ks, vs = make_case(batch, ctx, "cpu", torch.float32)
        want = paged_attention_decode(q, k8, v8, tables, lens, scale, k_scale=ks, v_scale=vs,
                                      num_splits=1)
        for prefetch in (0, 1):
            got = decode_vt(q, k8, vt8, tables, lens, scale, ks, vs, prefetch=prefetch)
            err = (got - want).abs().max().item()
            print(f"B={batch} ctx={ctx} prefetch={prefetch}: max |diff| {err:.2e}")
            assert err < 2e-2, err  # float16 products here, as kiln's e4m3 path on a GPU


def sass() -> None:
    """Main-loop SASS of both kernels, compiled for sm_90 (no GPU)."""
    from kiln.kernels import attention_decode
    from kiln.kernels.compile_check import main_loop_sass

    common = {"q_ptr": "*bf16", "out_ptr": "*bf16", "block_tables_ptr": "*i32",
              "seq_lens_ptr": "*i32", "qk_scale": 0.1, "k_scale_ptr": "*fp32",
              "v_scale_ptr": "*fp32", "stride_qh": 128, "stride_oh": 128, "stride_kb": 16384,
              "stride_ks": 1024, "stride_kh": 128, "stride_bt": 511}
    shape = {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_G": 16, "BLOCK_N": 64}
    kiln_args = {**common, "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv",
                 "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "window": 4096,
                 "softcap": 72.1, "alibi_ptr": "*fp32", "cos_sin_ptr": "*fp32",
                 "stride_cs": 128}
    kiln_shape = {**shape, "BLOCK_D": 128, "DOT_PREC": "tf32", "WINDOW": False,
                  "SOFTCAP": False, "ALIBI": False, "ROPE_K": False, "NUM_SPLITS": 1,
                  "PREFETCH": 1}
    vt_args = {**common, "k_cache_ptr": "*fp8e4nv", "vt_cache_ptr": "*fp8e4nv",
               "stride_vb": 16384, "stride_vh": 2048}
    for name, fn, args, consts in (
            ("kiln e4m3", attention_decode._decode_kernel, kiln_args, kiln_shape),
            ("V transposed", _vt_decode_kernel, vt_args, {**shape, "PREFETCH": 1})):
        counts = main_loop_sass(fn, args, consts, 2, 3)
        print(f"{name}: {sum(counts.values())} instructions a 64-key tile; "
              + ", ".join(f"{op} {n}" for op, n in counts.most_common(12)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shapes", default="512x1536,496x256,496x192,256x1024,64x8192")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sass", action="store_true")
    args = ap.parse_args()
    if args.sass:
        sass()
        return
    if args.quick or os.environ.get("TRITON_INTERPRET") == "1":
        quick()
        return
    sys.path.insert(0, os.path.dirname(__file__))
    from fp8_gemm import time_calls  # CUDA-graph replays over copies of the inputs

    scale = HEAD_DIM ** -0.5
    block_n, stages, warps, prefetch = decode_config(torch.float8_e4m3fn, HEAD_DIM)
    results = []
    for spec in args.shapes.split(","):
        batch, ctx = (int(x) for x in spec.split("x"))
        q, k8, v8, vt8, tables, lens, ks, vs = make_case(batch, ctx, "cuda", torch.bfloat16)
        kiln = partial(paged_attention_decode, q, k8, v8, tables, lens, scale, k_scale=ks,
                       v_scale=vs, num_splits=1)
        row = dict(batch=batch, ctx=ctx)
        want = kiln()
        cache_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM
        for name, fn in (("kiln", kiln), *(
                (f"vt stages={st} warps={w} prefetch={pre}",
                 partial(decode_vt, q, k8, vt8, tables, lens, scale, ks, vs, block_n, st, w,
                         pre))
                for st, w, pre in ((stages, warps, prefetch), (2, 2, 1), (4, 2, 1),
                                   (3, 4, 1), (2, 4, 0)))):
            err = (fn().float() - want.float()).abs().max().item()
            if err > 2e-2:
                print(f"{spec} {name}: differs from kiln by {err:.3f}; not timed")
                continue
            ms = time_calls(fn, [()]) * 1e3
            row[name] = ms
            print(f"B={batch:4d} ctx={ctx:5d} {name:34s} {ms:.4f} ms "
                  f"{cache_bytes / ms / 1e6:6.0f} GB/s", flush=True)
        results.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
