"""Experiment: "swap AB" paged decode attention, keys as the MMA's M dimension.

kiln's decode kernel (kiln/kernels/attention_decode.py) computes s = q @ K^T with q the
GROUP = 4 query heads of a KV head padded to 16 rows: the MMA's M is 16 and 3/4 of each
QK and PV product is padding. With an e4m3 cache that kernel is latency-bound on an H200
(255 registers a thread at 2 warps; ~3.0 TB/s vs 4.4 for bf16). This prototype swaps
the operands so that the keys fill M:

    S^T [BLOCK_N, BLOCK_G] = K_tile [BLOCK_N, D] @ Q^T [D, BLOCK_G]
    online softmax along axis 0 (the keys), one running (m, l) per query column
    O^T [D, BLOCK_G] = O^T * alpha[None, :] + V^T_tile [D, BLOCK_N] @ P^T [BLOCK_N, BLOCK_G]
    out[seq, head, :] = (O^T / l)^T (* v_scale for a 1-byte cache)

so that on Hopper Triton may use wgmma (M = 64 a warpgroup) with the K tile converted
e4m3 -> float16 in registers as the register A operand and Q^T (loaded once) as B. One
program a (sequence, KV head), one split (the whole context), no window / softcap /
ALiBi. A bf16 cache runs through the same kernel (no conversion) for comparison.

What Triton 3.6 makes of it for sm_90 (`compile` below): BLOCK_G = 16 gets wgmma
(HGMMA 64x16x16) for both products, the e4m3 K and V tiles cp.async'ed to shared memory,
read into the register A-operand layout and converted there (F2FP.F16.E4M3), Q^T and
P^T as shared-memory B operands; 98 registers, no spills at BLOCK_N 64 / 4 warps (kiln's
e4m3 kernel: 255 at 2 warps). BLOCK_G = 8 falls back to mma.sync (HMMA). The V^T tile
([D, N]: N not contiguous in the cache) reaches its A operand one LDS.U8 a value;
V_TRANS=1 instead reads V as stored ([N, D], 16-byte loads), converts, and transposes in
registers (through shared memory: STS.128 + LDSM.T), at more registers.

    # correctness vs kiln's paged_attention_decode and a torch reference (CPU: interpreter)
    TRITON_INTERPRET=1 python benchmarks/attn_decode_swapab.py check
    # on a GPU: timings vs kiln (e4m3 and bf16 caches), a config sweep, JSON out
    PYTHONPATH=$PWD python benchmarks/attn_decode_swapab.py bench swapab.json
    # offline sm_90 compile (no GPU needed, Triton not in interpreter mode; here Triton 3.6
    # first on the path): registers, spills, wgmma (HGMMA) vs mma.sync (HMMA), main-loop
    # instructions, for every swept config and kiln's kernel as it launches it
    PYTHONPATH=/tmp/t36:$PWD python benchmarks/attn_decode_swapab.py compile [out.json]

Measured on an H200 (twenty-first session, benchmarks/results/h200-2026-12-02-s21/3-swapab):
correct (worst |diff| 7.5e-3 over every config), but the best e4m3 config (128 keys,
4 warps, 2 stages) takes 0.512 ms at B=512 x 1536 vs 0.553 for kiln's launch then (1.08x),
the same ~3.1 TB/s that a register cap or kiln's 3-stage launch reach (0.479 ms): twice
the warps an SM did not lift the 1-byte cache past that, so it was not taken into kiln.
bf16: 1.00-1.01x.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from functools import partial

import torch

if __name__ == "__main__" and sys.argv[1:2] == ["check"] and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

LOG2E = 1.4426950408889634
HEADS, KV_HEADS, D, BS = 32, 8, 128, 16
BENCH_SHAPES = [(512, 1536), (256, 1024), (64, 8192)]
# (BLOCK_N, num_warps, num_stages, BLOCK_G, V_TRANS); BLOCK_G = 8 compiles to mma.sync
# (Triton 3.6 takes wgmma for N >= 16 only), so V_TRANS is swept at BLOCK_G = 16 only
SWEEP = [(*c, False) for c in itertools.product((64, 128), (4, 8), (2, 3), (16, 8))] + \
    [(*c, 16, True) for c in itertools.product((64, 128), (4, 8), (2, 3))]


@triton.jit
def _swapab_tile(qt, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row_ptr, n0, n_end,
                 kv_head, qk_scale, stride_kb, stride_ks, stride_kh,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASK: tl.constexpr, V_TRANS: tl.constexpr):
    """Folds keys n0 .. n0 + BLOCK_N into the transposed running state: acc = O^T [D, G],
    m_i / l_i [G] (base-2 max and sum per query column). MASK: drop keys >= n_end."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if MASK:
        n_ok = offs_n < n_end
        block = tl.load(table_row_ptr + offs_n // BLOCK_SIZE, mask=n_ok, other=0)
    else:
        block = tl.load(table_row_ptr + offs_n // BLOCK_SIZE)
    kv_off = (block.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_ks
              + kv_head * stride_kh)
    # K tile [N, D]: the A operand (rows = keys)
    if MASK:
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=n_ok[:, None],
                    other=0.0)
    else:
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :])
    st = tl.dot(k.to(qt.dtype), qt) * qk_scale  # S^T [N, G], float32
    if MASK:
        st = tl.where(n_ok[:, None], st, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(st, axis=0))
    p = tl.exp2(st - m_new[None, :])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    if V_TRANS:  # V [N, D] as stored, converted, then transposed in registers
        if MASK:
            v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=n_ok[:, None],
                        other=0.0)
        else:
            v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :])
        vt = tl.trans(v.to(qt.dtype))
    else:  # V^T tile [D, N] read as such (the A operand of the PV product)
        if MASK:
            vt = tl.load(v_cache_ptr + kv_off[None, :] + offs_d[:, None], mask=n_ok[None, :],
                         other=0.0)
        else:
            vt = tl.load(v_cache_ptr + kv_off[None, :] + offs_d[:, None])
    acc = acc * alpha[None, :]
    acc = tl.dot(vt.to(qt.dtype), p.to(qt.dtype), acc)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["stride_bt"])  # block-table width varies by step
def _swapab_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, qk_scale,
    k_scale_ptr, v_scale_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, V_TRANS: tl.constexpr = False,
):
    """One (sequence, KV head): its GROUP query heads (columns of Q^T, padded to BLOCK_G)
    attend to the whole context. qk_scale = softmax scale * log2(e). A 1-byte e4m3 cache
    holds K / k_scale[kv_head] and V / v_scale[kv_head]: Q^T goes to float16, the tiles
    are converted to float16 in registers, k_scale joins qk_scale, v_scale the output."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + offs_g
    g_ok = offs_g[None, :] < GROUP
    qt = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + head[None, :] * stride_qh
                 + offs_d[:, None], mask=g_ok, other=0.0)  # Q^T [D, G]
    FP8: tl.constexpr = k_cache_ptr.dtype.element_ty == tl.float8e4nv
    if FP8:
        qt = qt.to(tl.float16)
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([HEAD_DIM, BLOCK_G], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    full_end = (seq_len // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _swapab_tile(qt, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row,
                                     n0, seq_len, kv_head, qk_scale, stride_kb, stride_ks,
                                     stride_kh, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, V_TRANS)
    if full_end < seq_len:
        acc, m_i, l_i = _swapab_tile(qt, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row,
                                     full_end, seq_len, kv_head, qk_scale, stride_kb,
                                     stride_ks, stride_kh, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True,
                                     V_TRANS)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[None, :]  # seq_len 0: zeros, not NaN
    if FP8:
        out = out * tl.load(v_scale_ptr + kv_head)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head[None, :] * stride_oh
             + offs_d[:, None], out.to(out_ptr.dtype.element_ty), mask=g_ok)


def swapab_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                  k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                  block_n: int = 64, block_g: int = 16, num_warps: int = 4,
                  num_stages: int = 2, v_trans: bool = False) -> torch.Tensor:
    """q [num_seqs, heads, d] -> out [num_seqs, heads, d] (q's dtype); caches
    [blocks, block_size, kv_heads, d] in bf16/fp16 or float8_e4m3fn (then k_scale and
    v_scale: float32 [kv_heads]). v_trans: read V as stored ([N, D]) and transpose the
    converted tile in registers, instead of loading V^T [D, N] directly."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    assert group <= block_g and head_dim == triton.next_power_of_2(head_dim)
    assert q.stride(-1) == 1 and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if k_cache.dtype == torch.float8_e4m3fn:
        assert k_scale is not None and v_scale is not None
    else:
        k_scale = v_scale = seq_lens  # never read
    out = torch.empty_like(q)
    _swapab_decode_kernel[(num_seqs, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, seq_lens, scale * LOG2E, k_scale, v_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_G=block_g,
        BLOCK_N=block_n, V_TRANS=v_trans, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def torch_reference(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale=None,
                    v_scale=None) -> torch.Tensor:
    """Gather each sequence's pages, dequantize, softmax in float32."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    group = q.shape[1] // k_cache.shape[2]
    for i, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        blocks = block_tables[i, pos // k_cache.shape[1]].long()
        slots = pos % k_cache.shape[1]
        k = k_cache[blocks, slots].float()  # [n, kv_heads, d]
        v = v_cache[blocks, slots].float()
        if k_scale is not None:
            k, v = k * k_scale[None, :, None], v * v_scale[None, :, None]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-KV-head e4m3 cache: x [blocks, bs, kv_heads, d] -> (x / scale, scale)."""
    scale = (x.abs().amax(dim=(0, 1, 3)) / 448.0).clamp_min(1e-8).float()
    return (x / scale[None, None, :, None]).to(torch.float8_e4m3fn), scale


def make_inputs(lens: list[int], dtype: torch.dtype, device: str, spare_blocks: int = 1,
                seed: int = 0, q_dtype: torch.dtype = torch.bfloat16):
    """q, caches (block tables a random permutation of the pool), lens, scales; made on
    `device` (the bench's caches are GBs)."""
    g = torch.Generator(device=device).manual_seed(seed)
    blocks_per = max(-(-max(lens) // BS), 1)
    pool = len(lens) * blocks_per + spare_blocks
    kf = torch.randn(pool, BS, KV_HEADS, D, generator=g, device=device)
    vf = torch.randn(pool, BS, KV_HEADS, D, generator=g, device=device)
    kf[..., 3, :] *= 4.0  # heads of different ranges: distinct scales
    q = torch.randn(len(lens), HEADS, D, generator=g, device=device).to(q_dtype)
    tables = torch.randperm(pool, generator=g, device=device)[: len(lens) * blocks_per]
    tables = tables.view(len(lens), blocks_per).to(torch.int32)
    if dtype == torch.float8_e4m3fn:
        (k, k_scale), (v, v_scale) = quantize_e4m3(kf), quantize_e4m3(vf)
        scales = {"k_scale": k_scale, "v_scale": v_scale}
    else:
        k, v, scales = kf.to(dtype), vf.to(dtype), {}
    del kf, vf
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k, v, tables, seq_lens, scales


def check() -> None:
    from kiln.kernels.attention_decode import paged_attention_decode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    scale = D ** -0.5
    worst = 0.0
    print(f"device {device}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    # the interpreter (numpy) gets bfloat16 dot products wrong: a float16 cache and q there
    half = torch.bfloat16 if device == "cuda" else torch.float16
    for lens in ([1, 70, 200], [64, 128, 0, 33]):
        for name, dtype in ((str(half)[6:], half), ("e4m3", torch.float8_e4m3fn)):
            q_dtype = half if dtype == half else torch.bfloat16
            q, k, v, tables, seq_lens, scales = make_inputs(lens, dtype, device,
                                                            q_dtype=q_dtype)
            ref = torch_reference(q, k, v, tables, seq_lens, scale, **scales)
            kiln = paged_attention_decode(q, k, v, tables, seq_lens, scale, num_splits=1,
                                          **scales).float()
            live = seq_lens.bool()[:, None, None]  # kiln leaves empty rows at zero too
            d_kiln_ref = (kiln - ref).abs().max().item()
            configs = [(64, 4, 2, 16, False), (128, 4, 2, 16, False), (64, 4, 2, 8, False),
                       (128, 8, 3, 8, False), (64, 4, 2, 16, True), (128, 4, 2, 8, True)]
            if device == "cuda":
                configs = SWEEP
            for block_n, warps, stages, block_g, v_trans in configs:
                out = swapab_decode(q, k, v, tables, seq_lens, scale, block_n=block_n,
                                    block_g=block_g, num_warps=warps, num_stages=stages,
                                    v_trans=v_trans,
                                    **scales).float()
                d_kiln = (out - kiln).abs().max().item()
                d_ref = (out - ref).abs().max().item()
                zero_ok = bool((out * ~live == 0).all())
                worst = max(worst, d_kiln, d_ref)
                print(f"lens={lens} {name:8} BLOCK_N={block_n:3} warps={warps} "
                      f"stages={stages} BLOCK_G={block_g:2} V_TRANS={int(v_trans)}: "
                      f"max|swapab - kiln| {d_kiln:.2e}  max|swapab - torch| {d_ref:.2e}  "
                      f"(kiln - torch {d_kiln_ref:.2e}) empty rows zero: {zero_ok}")
                assert zero_ok
    print(f"worst max abs diff {worst:.2e}: {'OK' if worst < 2e-2 else 'TOO LARGE'}")
    assert worst < 2e-2


def bench(path: str) -> None:
    from triton.testing import do_bench

    from kiln.kernels.attention_decode import paged_attention_decode

    scale = D ** -0.5
    rows = []

    def timed(shape, dtype_name, impl, config, fn, nbytes, ref):
        try:
            out = fn()
            diff = (out.float() - ref).abs().max().item() if ref is not None else 0.0
            ms = do_bench(fn, warmup=5, rep=25, return_mode="median")
        except Exception as e:  # noqa: BLE001 -- out of shared memory, compile errors
            print(f"  {impl} {config}: skipped ({type(e).__name__}: {str(e)[:80]})")
            return None
        row = dict(batch=shape[0], ctx=shape[1], dtype=dtype_name, impl=impl, **config,
                   ms=ms, tbps=nbytes / ms / 1e9, max_diff_vs_kiln=diff)
        rows.append(row)
        cfg = " ".join(f"{k}={v}" for k, v in config.items())
        print(f"B={shape[0]:4} ctx={shape[1]:5} {dtype_name:4} {impl:7} {cfg:52} "
              f"{ms:7.3f} ms {row['tbps']:5.2f} TB/s  diff {diff:.1e}", flush=True)
        return out

    print(f"{'shape':19} {'dtype':4} {'impl':7} {'config':52} {'time':>10} {'bandwidth':>10}")
    for (batch, ctx), (name, dtype) in itertools.product(
            BENCH_SHAPES, (("e4m3", torch.float8_e4m3fn), ("bf16", torch.bfloat16))):
        q, k, v, tables, seq_lens, scales = make_inputs([ctx] * batch, dtype, "cuda")
        nbytes = 2 * batch * ctx * KV_HEADS * D * k.element_size()
        common = (q, k, v, tables, seq_lens, scale)
        ref = timed((batch, ctx), name, "kiln", {"splits": 1},
                    partial(paged_attention_decode, *common, num_splits=1, **scales),
                    nbytes, None).float()
        timed((batch, ctx), name, "kiln", {"splits": "default"},
              partial(paged_attention_decode, *common, **scales), nbytes, ref)
        for block_n, warps, stages, block_g, v_trans in SWEEP:
            config = dict(block_n=block_n, warps=warps, stages=stages, block_g=block_g,
                          v_trans=int(v_trans))
            timed((batch, ctx), name, "swapab", config,
                  partial(swapab_decode, *common, block_n=block_n, block_g=block_g,
                          num_warps=warps, num_stages=stages, v_trans=v_trans, **scales),
                  nbytes, ref)
        del q, k, v, tables, common, ref
        torch.cuda.empty_cache()
    print("\nbest per shape / dtype:")
    for (batch, ctx), name in itertools.product(BENCH_SHAPES, ("e4m3", "bf16")):
        sel = [r for r in rows if (r["batch"], r["ctx"], r["dtype"]) == (batch, ctx, name)]
        for impl in ("kiln", "swapab"):
            mine = [r for r in sel if r["impl"] == impl]
            base = [r["ms"] for r in sel if r["impl"] == "kiln" and r["splits"] == 1]
            if mine and base:
                b = min(mine, key=lambda r: r["ms"])
                cfg = {k: b[k] for k in ("splits", "block_n", "warps", "stages", "block_g",
                                         "v_trans") if k in b}
                print(f"B={batch:4} ctx={ctx:5} {name:4} {impl:7} {b['ms']:.3f} ms "
                      f"{b['tbps']:.2f} TB/s ({base[0] / b['ms']:.2f}x kiln splits=1) {cfg}")
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__,
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"wrote {path}")


def _resources(kernel, num_warps: int, block_n: int) -> dict:
    """Registers, spills, shared memory, MMA instructions and an occupancy estimate of an
    sm_90 compiled kernel (H100/H200: 64K registers, 228 KB shared memory an SM)."""
    from kiln.kernels import compile_check as cc

    usage = cc._cuobjdump(kernel, "--dump-resource-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    sass = cc._cuobjdump(kernel, "-sass")
    ptx = kernel.asm["ptx"]
    regs, stack = int(found[1]), int(found[2])
    smem = kernel.metadata.shared
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = 65536 // regs_per_warp // num_warps
    by_smem = (228 * 1024) // (smem + 1024) if smem else 32
    lines = [(int(m[1], 16), m[2]) for m in
             re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
    loop = (0, -1)  # the main loop: the longest backward branch
    for addr, text in lines:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target[1], 16) < addr and \
                addr - int(target[1], 16) > loop[1] - loop[0]:
            loop = (int(target[1], 16), addr)
    loop_instr = sum(loop[0] <= addr <= loop[1] for addr, _ in lines)
    return dict(registers=regs, spill_stack_bytes=stack, shared_bytes=smem,
                programs_per_sm=min(by_regs, by_smem, 64 // num_warps, 32),
                sass_HGMMA=len(re.findall(r"\bHGMMA\.", sass)),
                sass_HMMA=len(re.findall(r"\bHMMA\.", sass)),
                ptx_wgmma=ptx.count("wgmma.mma_async."), ptx_mma_sync=ptx.count("mma.sync."),
                sass_local_ld=len(re.findall(r"\bLDL\b", sass)),
                sass_local_st=len(re.findall(r"\bSTL\b", sass)),
                loop_instructions=loop_instr, loop_warp_instr_per_key=loop_instr * num_warps
                / block_n)


def compile_report(path: str | None) -> None:
    """Compile for sm_90 offline (Triton's compile API via kiln.kernels.compile_check)."""
    from kiln.kernels import attention_decode
    from kiln.kernels import compile_check as cc

    results = []
    common = {"q_ptr": "*bf16", "out_ptr": "*bf16", "block_tables_ptr": "*i32",
              "seq_lens_ptr": "*i32", "qk_scale": 0.1, "k_scale_ptr": "*fp32",
              "v_scale_ptr": "*fp32", "stride_qt": 4096, "stride_qh": 128, "stride_ot": 4096,
              "stride_oh": 128, "stride_kb": 16384, "stride_ks": 1024, "stride_kh": 128,
              "stride_bt": 511}  # stride_bt is not specialised at launch: no divisibility
    for cache, (block_n, warps, stages, block_g, v_trans) in itertools.product(
            ("fp8e4nv", "bf16"), SWEEP):
        values = {**common, "k_cache_ptr": "*" + cache, "v_cache_ptr": "*" + cache}
        const = {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_G": block_g,
                 "BLOCK_N": block_n, "V_TRANS": v_trans}
        try:
            kernel = cc._compile(_swapab_decode_kernel, values, const, warps, stages)
            res = _resources(kernel, warps, block_n)
        except Exception as e:  # noqa: BLE001
            res = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
        results.append(dict(kernel="swapab", cache=cache, block_n=block_n, warps=warps,
                            stages=stages, block_g=block_g, v_trans=int(v_trans), **res))
    attn = {**common, "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv",
            "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "window": 4096, "softcap": 72.1,
            "alibi_ptr": "*fp32", "cos_sin_ptr": "*fp32", "stride_cs": 128}
    shape = {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_D": 128, "DOT_PREC": "tf32",
             "WINDOW": False, "SOFTCAP": False, "ALIBI": False, "ROPE_K": False,
             "BLOCK_G": 16, "NUM_SPLITS": 1}
    for cache, block_n, warps, stages in (("fp8e4nv", 64, 2, 2), ("fp8e4nv", 128, 2, 2),
                                          ("bf16", 64, 4, 2)):
        kernel = cc._compile(attention_decode._decode_kernel,  # kiln, as launched
                             {**attn, "k_cache_ptr": "*" + cache, "v_cache_ptr": "*" + cache},
                             {**shape, "BLOCK_N": block_n}, warps, stages)
        results.append(dict(kernel="kiln", cache=cache, block_n=block_n, warps=warps,
                            stages=stages, block_g=16, v_trans=0,
                            **_resources(kernel, warps, block_n)))
    print(f"triton {triton.__version__}, sm_90")
    print("spill: local stack bytes; LDL/STL: local loads/stores in SASS; prog/SM: resident "
          "programs an SM (registers, smem); HGMMA/HMMA: in all SASS; loop: SASS "
          "instructions of the main loop per key, summed over the program's warps")
    print(f"{'kernel':7} {'cache':8} {'N':>4} {'warps':>5} {'stg':>3} {'G':>3} {'Vt':>2} "
          f"{'regs':>4} {'spill':>5} {'LDL/STL':>7} {'smem':>6} {'prog/SM':>7} {'HGMMA':>5} "
          f"{'HMMA':>5} {'loop':>5}")
    for r in results:
        head = (f"{r['kernel']:7} {r['cache']:8} {r['block_n']:4} {r['warps']:5} "
                f"{r['stages']:3} {r['block_g']:3} {r['v_trans']:2}")
        if "error" in r:
            print(f"{head} {r['error']}")
            continue
        print(f"{head} {r['registers']:4} {r['spill_stack_bytes']:5} "
              f"{r['sass_local_ld']:3}/{r['sass_local_st']:<3} {r['shared_bytes']:6} "
              f"{r['programs_per_sm']:7} {r['sass_HGMMA']:5} {r['sass_HMMA']:5} "
              f"{r['loop_warp_instr_per_key']:5.1f}")
    if path:
        with open(path, "w") as f:
            json.dump({"triton": triton.__version__, "rows": results}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="correctness vs kiln and torch (CPU: interpreter)")
    b = sub.add_parser("bench", help="GPU timings vs kiln, JSON out")
    b.add_argument("out", help="JSON file to write")
    c = sub.add_parser("compile", help="offline sm_90 compile: registers, spills, wgmma")
    c.add_argument("out", nargs="?", help="optional JSON file to write")
    args = parser.parse_args()
    if args.cmd == "check":
        check()
    elif args.cmd == "bench":
        assert torch.cuda.is_available(), "bench needs a GPU"
        bench(args.out)
    else:
        compile_report(args.out)


if __name__ == "__main__":
    main()
