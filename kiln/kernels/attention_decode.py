"""Paged attention for one query token per sequence: flash-decoding, split over the context.

CUDA-graph safe: the grid and every kernel argument are fixed by static shapes (batch
rows, block-table width, the split count chosen from them); how much of the context
each split covers is computed on the device from seq_lens, and splits with nothing to
do exit at once. Nothing here reads a device value on the host (a 1-byte KV cache's
scales included: each program loads its KV head's k_scale and v_scale).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.kernels import num_sms, pdl
from kiln.kernels.attention_decode_heads import launch_decode_heads
from kiln.kernels.attention_splits import (
    FUSED_REDUCE,
    _active_splits,
    _reduce_kernel,
    _split_len,
    combine_splits,
)
from kiln.kernels.kv_operands import kv_query
from kiln.kernels.paged import (
    LOG2E,
    LOG2E_C,
    NATIVE_E4M3,
    NATIVE_E4M3_V,
    attend_tile,
    check_v_tiles,
    context_start,
    dot_precision,
    head_block,
    kv_block_ids,
    kv_scale,
    kv_scale_args,
    v_transposed,
)
from kiln.kernels.pdl import pdl_enter
from kiln.kernels.split_k import split_k_counters

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MIN_TOKENS_PER_SPLIT = 256
# 16-bit caches take 128-key tiles, 3 stages, 4 warps where a split can get >= 1024 keys in
# an engine of >= 16k tokens (KILN_DECODE_LONG_TILES=0: 64-key tiles everywhere). H200,
# bf16, Llama-3.1-8B shape, alternating runs (33rd session): batch 1 at 32k (32 splits)
# 85.2 / 85.2% of the roofline against 83.4 / 83.4% (TPOT 5.29 vs 5.41 ms); 4 x 16000 in
# a 32k engine (16 splits) TPOT 14.40 vs 14.88 ms; but 8 x 4000 in an 8k engine (8 splits
# of ~500 real keys) 8.44 / 8.47 vs 8.31 / 8.32, hence the engine-size test. The choice
# is static (CUDA graphs), so a long engine whose splits get ~500 real keys loses as much.
LONG_TILES = os.environ.get("KILN_DECODE_LONG_TILES", "1") != "0"
LONG_SPLIT, LONG_CONTEXT = 1024, 16384


def _register_cap(text: str) -> int | None:
    """KILN_KV8_DECODE_MAXNREG: a register cap (ptxas maxnreg) for decode attention over
    a 1-byte cache, off unless set. Measured on an H200 (twenty-first session), the e4m3
    launch of the twentieth session (64 keys, 2 stages, 2 warps: 255 registers, 4 programs
    an SM) capped at 168: 0.553 -> 0.513 ms at B=512 x 1536, but 0.358 -> 0.373 at 64 x
    8192 and 0.056 -> 0.063 at 1 x 1024 (grids that fill no more slots than the uncapped
    kernel has), and FP8 1000 / 1000 (512 requests) 14,502-14,546 -> 14,873-14,910 out
    tok/s. The launch decode_config picks now (3 stages, blocks one tile ahead) gains as
    much without a cap, so none is set by default."""
    if not text:
        return None
    if not text.isdigit() or not 64 <= int(text) <= 255:
        raise ValueError(f"KILN_KV8_DECODE_MAXNREG={text!r}: a register count from 64 to 255")
    return int(text)


def _max_splits(text: str) -> int:
    """KILN_DECODE_MAX_SPLITS: the most context splits decode attention takes (default 32),
    a power of two."""
    if not text:
        return 32
    if not text.isdigit() or not 1 <= int(text) <= 256 or int(text) & (int(text) - 1):
        raise ValueError(f"KILN_DECODE_MAX_SPLITS={text!r}: a power of two from 1 to 256")
    return int(text)


KV8_MAXNREG = _register_cap(os.environ.get("KILN_KV8_DECODE_MAXNREG", ""))
MAX_SPLITS = _max_splits(os.environ.get("KILN_DECODE_MAX_SPLITS", ""))
# KILN_DECODE_HEADS_PER_PROGRAM=N: several KV heads a program where the batch fills the GPU
# without splits (kiln.kernels.attention_decode_heads); an experiment knob, untimed.
HEADS_PER_PROGRAM = int(os.environ.get("KILN_DECODE_HEADS_PER_PROGRAM", "1") or 1)


@triton.jit(do_not_specialize=["stride_bt"])  # block-table width varies by step
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr, count_ptr,
    block_tables_ptr, seq_lens_ptr, qk_scale, k_scale_ptr, v_scale_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
    window, softcap, alibi_ptr, cos_sin_ptr, stride_cs,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, ROPE_K: tl.constexpr = False,
    PREFETCH: tl.constexpr = 0, V_T: tl.constexpr = False, FUSED: tl.constexpr = False,
    INTERPRET: tl.constexpr = False, DEPENDENTS: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """One (sequence, KV head, split): the GROUP query heads of that KV head attend to the
    split's slice of the context with an online softmax.

    With one split the result is final: o = acc / l. Otherwise the split writes its
    normalised partial o_s and lse_s = m_s + log2(l_s) (base 2) for the reduce kernel, or
    FUSED: for the last of its splits to combine (attention_splits.combine_splits).
    A 1-byte cache (compile-time branch on its element type) holds K / k_scale[kv_head] and
    V / v_scale[kv_head]: k_scale goes into the score scale, v_scale into o (and o_s, which
    the reduce combines linearly).
    WINDOW: the token sees its last `window` keys only, so the splits share those (the
    blocks before them are never read). SOFTCAP: scores -> c * tanh(score / c), softcap
    = c * log2(e). ALIBI: scores + alibi[head] * (key pos - (seq_len - 1)). ROPE_K
    (attention sinks): key n, cached before rotary, is rotated at position n as read. All
    constexpr: off, the plain code.
    PREFETCH (1: on): each tile's physical blocks are loaded one tile ahead, so the K / V
    loads of a tile wait on no load of that tile. V_T: V blocks stored transposed
    (paged.load_v_transposed). DEPENDENTS: the swapped GEMV behind it may start at once.
    PDL (launched with PDL behind the rotary + KV write, KILN_ATTN_PDL=0: not): waits for it first.
    """
    pdl_enter(PDL, DEPENDENTS)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_start = context_start(seq_len, window, WINDOW)
    split_len = _split_len(seq_len - ctx_start, NUM_SPLITS, BLOCK_N)
    start = ctx_start + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    head = kv_head * GROUP + offs_g
    io_mask = (offs_g[:, None] < GROUP) & (offs_d[None, :] < HEAD_DIM)
    out_off = seq.to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    if start >= end:
        if NUM_SPLITS == 1:  # empty (padding) row: defined output, no NaN
            tl.store(out_ptr + out_off, tl.zeros([BLOCK_G, BLOCK_D], tl.float32).to(
                out_ptr.dtype.element_ty), mask=io_mask)
        elif FUSED:  # counted in all the same
            part = (seq.to(tl.int64) * tl.num_programs(1) * GROUP + head) * NUM_SPLITS
            combine_splits(out_ptr, out_off, io_mask, part_out_ptr, part_lse_ptr, part,
                           count_ptr, seq, kv_head,
                           _active_splits(seq_len, window, NUM_SPLITS, BLOCK_N, WINDOW),
                           offs_g, offs_d, GROUP, BLOCK_D, NUM_SPLITS, INTERPRET)
        return
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :], mask=io_mask, other=0.0)
    KV_QUANT: tl.constexpr = k_cache_ptr.dtype.element_ty.primitive_bitwidth == 8
    if KV_QUANT:
        q = kv_query(q, k_cache_ptr)
        qk_scale = qk_scale * kv_scale(k_cache_ptr, k_scale_ptr, kv_head, NATIVE_E4M3)
    q_pos = offs_g  # read by attend_tile for ALiBi only (decode needs no causal mask)
    slopes = 0.0
    if ALIBI:
        q_pos = tl.zeros([BLOCK_G], tl.int32) + (seq_len - 1)
        slopes = tl.load(alibi_ptr + head, mask=offs_g < GROUP, other=0.0) * LOG2E_C
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    full_end = start + ((end - start) // BLOCK_N) * BLOCK_N
    AHEAD: tl.constexpr = PREFETCH != 0
    offs_t = tl.arange(0, BLOCK_N)
    blocks = 0
    if AHEAD:
        blocks = kv_block_ids(table_row, start + offs_t, end, BLOCK_SIZE, True)
    for n0 in range(start, full_end, BLOCK_N):
        if AHEAD:
            after = kv_block_ids(table_row, n0 + BLOCK_N + offs_t, end, BLOCK_SIZE, True)
        acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row,
                                    n0, end, q_pos, kv_head, qk_scale,
                                    stride_kb, stride_ks, stride_kh, BLOCK_N, BLOCK_D,
                                    HEAD_DIM, BLOCK_SIZE, False, False, DOT_PREC,
                                    window, softcap, False, SOFTCAP, slopes, ALIBI,
                                    cos_sin_ptr, stride_cs, ROPE_K, blocks, AHEAD, V_T)
        if AHEAD:
            blocks = after
    if full_end < end:
        acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row,
                                    full_end, end, q_pos, kv_head, qk_scale,
                                    stride_kb, stride_ks, stride_kh, BLOCK_N, BLOCK_D,
                                    HEAD_DIM, BLOCK_SIZE, True, False, DOT_PREC,
                                    window, softcap, False, SOFTCAP, slopes, ALIBI,
                                    cos_sin_ptr, stride_cs, ROPE_K, blocks, AHEAD, V_T)
    out = acc / l_i[:, None]
    if KV_QUANT:
        out = out * kv_scale(k_cache_ptr, v_scale_ptr, kv_head, NATIVE_E4M3_V)
    if NUM_SPLITS == 1:
        tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # partials laid out [seq, head, split, d] and [seq, head, split]
        part = (seq.to(tl.int64) * tl.num_programs(1) * GROUP + head) * NUM_SPLITS
        mine = part + split
        tl.store(part_out_ptr + mine[:, None] * BLOCK_D + offs_d[None, :], out, mask=io_mask)
        tl.store(part_lse_ptr + mine, m_i + tl.log2(l_i), mask=offs_g < GROUP)
        if FUSED:
            combine_splits(out_ptr, out_off, io_mask, part_out_ptr, part_lse_ptr, part,
                           count_ptr, seq, kv_head,
                           _active_splits(seq_len, window, NUM_SPLITS, BLOCK_N, WINDOW),
                           offs_g, offs_d, GROUP, BLOCK_D, NUM_SPLITS, INTERPRET)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int,
                      device: torch.device) -> int:
    """Enough (sequence, head, split) programs for ~2 waves, each split >= 256 tokens.

    Depends on static sizes only, so a captured graph keeps it; a power of two so that
    few kernel variants get compiled.
    """
    sms = num_sms(device)
    wanted = triton.cdiv(2 * sms, max(num_seqs * num_kv_heads, 1))
    splits = min(wanted, triton.cdiv(max_seq_len, MIN_TOKENS_PER_SPLIT), MAX_SPLITS)
    return triton.next_power_of_2(max(splits, 1))


def decode_config(cache_dtype: torch.dtype, block_d: int, block_g: int = 16,
                  rope_k: bool = False, v_t: bool = False,
                  split_tokens: int | None = None, context: int = 0
                  ) -> tuple[int, int, int, int]:
    """(BLOCK_N, num_stages, num_warps, PREFETCH) per KV cache dtype.

    Measured on an H200 (benchmarks/attn_decode_sweep.py: B=512 ctx 1536, B=256 ctx 1024,
    B=64 ctx 8192; 32 q / 8 KV heads, d=128; 27 configs each). 16-bit caches run at the
    copy bandwidth (4.3 TB/s) with 64-key tiles, 2 stages, 4 warps (the best config is
    within 1%; PREFETCH gains nothing there beyond noise and takes 138 registers instead
    of 128). e4m3 is bound on the SM side, not by the bytes (~3 TB/s): the hardware
    conversion with 64-key tiles and 2 warps (128-key tiles spill 320 bytes a thread,
    compile_check). Twenty-first session: with 3 stages and each tile's blocks loaded one
    tile ahead (PREFETCH 1) B=512 x 1536 takes 0.479 ms instead of 0.548 (2 stages, none),
    and FP8 + FP8 KV end to end: 1000 / 1000 (512 requests) 14,944 out tok/s vs 14,502,
    128 / 128 25,835 / 25,679 vs 25,759 / 25,011 (alternating runs). int8: 64 keys, 4
    warps. Two warps only for up to 16 query heads a KV head (a bigger accumulator spills)
    and keys rotated elsewhere (not attention sinks' in-kernel rotary).
    Twenty-fifth session, V transposed in the blocks (v_t, the default 1-byte layout since
    the 24th): its lighter loop (184 registers, not 253) takes 128-key tiles on 2 warps, 3
    stages, prefetch 1, the best of 54 launches at every shape swept
    (benchmarks/attn_decode_vt.py --sweep): B=512 x 1536 0.403 ms vs 0.458 with 64 keys,
    256 x 1024 0.148 vs 0.160, 64 x 8192 0.259 vs 0.294, 496 x 256 0.092 vs 0.094.
    Twenty-seventh session, int8 on the transposed layout (SmoothQuant engines' KV; the same
    54 launches): 128 keys, 2 warps, 3 stages, no prefetch, against the 64 keys / 4 warps it
    had: 512 x 1536 0.454 ms vs 0.585, 256 x 1024 0.165 vs 0.214, 64 x 8192 0.291 vs 0.513,
    496 x 256 0.104 vs 0.114 (32 keys 0.097 there: not worth a launch of its own).
    Twenty-eighth session, e4m3 at small batches (split_tokens: the most keys a split can
    get, max context / splits, static): splits are whole tiles, so 128-key tiles leave
    most of batch 1's 8 splits empty at short contexts; where a split gets at most 256
    keys (batch 1-8 at a 2048-token limit: the case measured), 64-key tiles on 4 warps, 2
    stages, prefetch 1 (the best sum over 54 launches, 8 splits, us): 1 x 256 6.3 vs 8.1,
    1 x 512 6.2 vs 8.1, 4 x 384 7.3 vs 9.0; FP8 batch 1 333.3 vs 325.3 tok/s with
    the swapped GEMMs at 17-64 rows. context: the most keys a sequence can have (the
    engine's limit or the window): long engines' 16-bit caches, LONG_TILES above.
    """
    if block_d <= 128 and block_g <= 16 and not rope_k:
        if cache_dtype == torch.float8_e4m3fn and NATIVE_E4M3:
            if v_t and split_tokens is not None and split_tokens <= 256:
                return 64, 2, 4, 1
            return (128 if v_t else 64), 3, 2, 1
        if cache_dtype == torch.int8 and v_t:
            return 128, 3, 2, 0
        if LONG_TILES and cache_dtype.itemsize == 2 and split_tokens is not None and \
                split_tokens >= LONG_SPLIT and context >= LONG_CONTEXT:
            return 128, 3, 4, 0
    return (64 if block_d <= 128 else 32), 2, 4, 0


def paged_attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, scale: float, max_seq_len: int | None = None,
    num_splits: int | None = None, block_n: int | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    num_stages: int | None = None, sliding_window: int | None = None,
    softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
    key_rotary: torch.Tensor | None = None, num_warps: int | None = None,
    max_registers: int | None = None, prefetch: int | None = None,
    heads_per_program: int | None = None, out: torch.Tensor | None = None,
    fused_reduce: bool | None = None,
) -> torch.Tensor:
    """q [num_seqs, heads, d] (token i belongs to sequence i) -> out [num_seqs, heads, d]
    (written into `out` when given: any strides with a unit last one).

    sliding_window W: the token sees its last W keys; softcap c: scores -> c tanh(s / c);
    alibi_slopes (float32 [heads], on device): ALiBi biases, as in the reference;
    key_rotary (attention sinks): the rotary table; keys are cached
    before rotary and rotated at their index as read.

    max_seq_len (default: what the block table can address) must be static for CUDA
    graphs; the split count follows from it and the batch size unless given. A 1-byte
    cache (float8_e4m3fn, int8) needs k_scale and v_scale (float32 [kv_heads], on device).
    block_n, num_stages, num_warps and prefetch (the kernel's PREFETCH) default to
    decode_config's choice for the cache dtype; max_registers (ptxas maxnreg) to
    KILN_KV8_DECODE_MAXNREG for a 1-byte cache, else none. heads_per_program (default
    KILN_DECODE_HEADS_PER_PROGRAM where the batch alone gives 2 waves of programs, else 1)
    > 1: that many KV heads a program over the whole context (attention_decode_heads;
    num_splits is then not used); not with ALiBi or key_rotary (those take the one-head
    kernel), nor a count that does not divide the KV heads.
    fused_reduce (default KILN_DECODE_FUSED_REDUCE): splits combined by the last of them
    in the decode kernel instead of a reduce launch (kiln.kernels.attention_splits).
    With an e4m3 cache and a 16-bit q the products run in float16: |q| must stay below
    65504 (see paged.kv_query).
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.stride(-1) == 1
    if num_seqs == 0:
        return out
    v_t = v_transposed(k_cache, v_cache)
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1
    k_scale, v_scale = kv_scale_args(k_cache, v_cache, k_scale, v_scale)
    seq_lens = seq_lens.contiguous()
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * block_size
    max_ctx = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_ctx, q.device)
    assert num_splits & (num_splits - 1) == 0, "num_splits must be a power of two"
    block_d = head_block(head_dim)
    block_g = max(16, triton.next_power_of_2(group))
    default_n, default_stages, default_warps, default_prefetch = decode_config(
        k_cache.dtype, block_d, block_g, key_rotary is not None, v_t,
        triton.cdiv(max_ctx, num_splits) if num_splits > 1 else None, max_ctx)
    block_n, num_stages = block_n or default_n, num_stages or default_stages
    num_warps = num_warps or default_warps
    prefetch = default_prefetch if prefetch is None else prefetch
    check_v_tiles(v_t, block_n, block_size, sliding_window, key_rotary)
    if max_registers is None and k_cache.element_size() == 1:
        max_registers = KV8_MAXNREG
    cap = {"maxnreg": max_registers} if max_registers else {}  # none: the usual compile
    heads = heads_per_program or 1
    if heads_per_program is None and HEADS_PER_PROGRAM > 1 and num_splits == 1 and \
            num_seqs * num_kv_heads // HEADS_PER_PROGRAM >= 2 * num_sms(q.device):
        heads = HEADS_PER_PROGRAM
    if heads > 1 and num_kv_heads % heads == 0 and alibi_slopes is None and key_rotary is None:
        launch_decode_heads(q, k_cache, v_cache, out, block_tables, seq_lens, scale * LOG2E,
                            k_scale, v_scale, heads, sliding_window,
                            None if softcap is None else softcap * LOG2E, block_n, block_d,
                            block_g, dot_precision(q.dtype), num_stages, num_warps, prefetch,
                            cap, v_t)
        return out
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, block_d, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32,
                               device=q.device)
    else:
        part_out = part_lse = out  # unused
    fused = (FUSED_REDUCE if fused_reduce is None else fused_reduce) and num_splits > 1
    counters = split_k_counters(q.device, num_seqs * num_kv_heads) if fused else seq_lens
    use_pdl = pdl.ATTENTION and pdl.enabled(q)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, counters, block_tables, seq_lens,
        scale * LOG2E,
        k_scale, v_scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        sliding_window or 0, (softcap or 0.0) * LOG2E,
        alibi_slopes if alibi_slopes is not None else seq_lens,
        key_rotary if key_rotary is not None else seq_lens,
        key_rotary.stride(0) if key_rotary is not None else 0,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        NUM_SPLITS=num_splits, DOT_PREC=dot_precision(q.dtype),
        WINDOW=sliding_window is not None, SOFTCAP=softcap is not None,
        ALIBI=alibi_slopes is not None, ROPE_K=key_rotary is not None, num_warps=num_warps,
        num_stages=num_stages, PREFETCH=prefetch, V_T=v_t, FUSED=fused,
        INTERPRET=_INTERPRET, DEPENDENTS=pdl.dependents(q), PDL=use_pdl,
        **cap, **pdl.launch_args(use_pdl),
    )
    if num_splits > 1 and not fused:
        _reduce_kernel[(num_seqs, num_heads)](
            out, part_out, part_lse, seq_lens, out.stride(0), out.stride(1),
            sliding_window or 0, WINDOW=sliding_window is not None,
            HEAD_DIM=head_dim, BLOCK_N=block_n, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            num_warps=1 if block_d <= 64 else 2,
        )
    return out
