"""Pieces shared by the paged attention kernels: KV tile gather, one online-softmax step,
and the per-head scales of 1-byte (e4m3fn, int8) KV caches."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.kernels.kv_operands import (
    INT8_KV_F16,
    int8_halves,
    int8_word_pairs,
    kv_operand,
    unbias,
)
from kiln.kernels.paged_tma import tma_kv_tiles

LOG2E = 1.4426950408889634
LOG2E_C = tl.constexpr(LOG2E)
KV_QUANT_DTYPES = (torch.float8_e4m3fn, torch.int8)
# e4m3 tiles: converted by the hardware (cvt.rn.f16x2.e4m3x2, exact) by default.
# KILN_E4M3_NATIVE (read at import) picks per operand: "1" K and V by the hardware; "0"
# both with integer ops (e4m3_bytes / load_kv_words, values * 2^-8); "k" K by the hardware,
# V as int32 words with integer ops (ldmatrix.trans in 16 bits instead of a shared-memory
# byte load a value). H200, B=512 x 1536, 2 warps: "1" 0.552 ms, "0" 0.647 ms
# (benchmarks/attn_decode_sweep.py); "k" not measured.
_E4M3_MODE = os.environ.get("KILN_E4M3_NATIVE", "1")
if _E4M3_MODE not in ("0", "1", "k"):
    raise ValueError(f"KILN_E4M3_NATIVE={_E4M3_MODE!r}: use 1 (hardware conversion, the "
                     "default), 0 (integer ops) or k (hardware for K, integer ops for V)")
NATIVE_E4M3 = tl.constexpr(_E4M3_MODE in ("1", "k"))  # K (and anything else but V)
NATIVE_E4M3_V = tl.constexpr(_E4M3_MODE == "1")


@triton.jit
def context_start(seq_len, window, WINDOW: tl.constexpr):
    """The first key a decoded token sees: seq_len - window with a sliding window, else 0."""
    if WINDOW:
        return tl.maximum(seq_len - window, 0)
    return 0


@triton.jit
def kv_block_ids(table_row_ptr, offs_n, n_end, BLOCK_SIZE: tl.constexpr, MASK: tl.constexpr):
    """The physical block of each context token offs_n: table_row[n // BLOCK_SIZE] (0 for
    tokens >= n_end with MASK)."""
    if MASK:
        return tl.load(table_row_ptr + offs_n // BLOCK_SIZE, mask=offs_n < n_end, other=0)
    return tl.load(table_row_ptr + offs_n // BLOCK_SIZE)


@triton.jit
def kv_block_offsets(block, offs_n, kv_head, stride_kb, stride_ks, stride_kh,
                     BLOCK_SIZE: tl.constexpr):
    """Element offsets of context tokens offs_n (one KV head) held in blocks `block`:
    token n lives in slot n % BLOCK_SIZE of its block."""
    return (block.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_ks
            + kv_head * stride_kh)


@triton.jit
def kv_tile_offsets(table_row_ptr, offs_n, kv_head, stride_kb, stride_ks, stride_kh,
                    BLOCK_SIZE: tl.constexpr, MASK: tl.constexpr, n_end):
    """Element offsets of context tokens offs_n (one KV head) in a paged cache: token n
    in slot n % BLOCK_SIZE of physical block table_row[n // BLOCK_SIZE]."""
    block = kv_block_ids(table_row_ptr, offs_n, n_end, BLOCK_SIZE, MASK)
    return kv_block_offsets(block, offs_n, kv_head, stride_kb, stride_ks, stride_kh, BLOCK_SIZE)


@triton.jit
def softcap_scores(s, cap):
    """cap * tanh(s / cap), with tanh(x) = 1 - 2 / (2^(2x log2 e) + 1) (saturates to +-1;
    exact enough next to float32 scores, and the interpreter runs it)."""
    e = tl.exp2(s * (2.0 * 1.4426950408889634 / cap))
    return cap * (1.0 - 2.0 / (e + 1.0))


@triton.jit
def attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row_ptr, n0, n_end,
                q_pos, kv_head, qk_scale, stride_kb, stride_ks, stride_kh,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                DOT_PREC: tl.constexpr, window=0, softcap=0.0,
                WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
                slopes=0.0, ALIBI: tl.constexpr = False, cos_sin_ptr=None, stride_cs=0,
                ROPE_K: tl.constexpr = False, blocks=0, BLOCKS_GIVEN: tl.constexpr = False,
                V_T: tl.constexpr = False, k_desc=None, v_desc=None, TMA: tl.constexpr = False):
    """Folds keys n0 .. n0+BLOCK_N into the running (acc, m, l) of queries q [M, D].

    s = (q . k) * scale * log2(e);  m' = max(m, max_n s);  p = 2^(s - m')
    l' = l * 2^(m - m') + sum_n p;  acc' = acc * 2^(m - m') + p @ v
    MASK drops keys >= n_end; CAUSAL also drops keys after each query's position q_pos;
    WINDOW (with MASK) also keys at or before q_pos - window, and guards rows that see no
    key of the tile yet (m' = -inf). SOFTCAP: s = c * tanh(s / c), softcap = c * log2(e)
    (the cap of the natural-log scores, carried into base 2). ALIBI: s += slopes[row] *
    (n - q_pos[row]), slopes already times log2(e). All off compile to the plain code.
    q comes from kv_query (float16 for an e4m3 cache and a 16-bit model, and for an int8
    one by default, KILN_INT8_KV_F16: kv_operands); both products
    run in q's dtype. 1-byte caches reach them exactly: int8 converted as stored, e4m3 by
    the hardware's e4m3 -> f16 conversion (e4m3_tile; on the integer path, as value *
    2^-8 built from its bits with integer ops). The kernels fold k_scale into qk_scale and
    v_scale into the output (kv_scale). An int8 tile (and an e4m3 one on the integer path)
    is read as 32-bit words (load_kv_words) when head_dim % 4 == 0: V always, K for e4m3.
    A 16-bit cache compiles to the same code as before any of this.
    BLOCKS_GIVEN: the caller loaded the tile's physical blocks (kv_block_ids) already,
    e.g. one tile ahead, so that the K / V loads wait on no load of this tile.
    ROPE_K (attention sinks; any cache, a 1-byte K read as bytes): the cache holds keys
    before rotary, and key n is rotated at position n here (rotate_key_tile).
    V_T: the V cache's blocks hold V transposed (load_v_transposed); n0 a multiple of the
    block size, BLOCK_N of it too. TMA: K and V come by tensor descriptors (paged_tma; the
    tile inside one block), values of keys past n_end zeroed here.
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCKS_GIVEN:
        kv_off = kv_block_offsets(blocks, offs_n, kv_head, stride_kb, stride_ks, stride_kh,
                                  BLOCK_SIZE)
    else:
        kv_off = kv_tile_offsets(table_row_ptr, offs_n, kv_head, stride_kb, stride_ks,
                                 stride_kh, BLOCK_SIZE, MASK, n_end)
    d_ok = offs_d < HEAD_DIM
    if MASK:
        n_ok = offs_n < n_end
        kt_mask = n_ok[None, :] & d_ok[:, None]
        v_mask = n_ok[:, None] & d_ok[None, :]
    else:
        kt_mask = d_ok[:, None]
        v_mask = d_ok[None, :]
    FP8: tl.constexpr = k_cache_ptr.dtype.element_ty == tl.float8e4nv
    WORDS: tl.constexpr = (k_cache_ptr.dtype.element_ty.primitive_bitwidth == 8
                           and HEAD_DIM % 4 == 0)
    if TMA:
        k, v_tile = tma_kv_tiles(k_desc, v_desc, table_row_ptr, n0, kv_head, BLOCK_N, HEAD_DIM,
                                 BLOCK_SIZE)
        kt = e4m3_tile(tl.trans(k), q.dtype, NATIVE_E4M3) if FP8 else tl.trans(k)
    elif FP8 and WORDS and not ROPE_K and not NATIVE_E4M3:
        k = load_kv_words(k_cache_ptr, kv_off, offs_n < n_end, q.dtype, BLOCK_N, BLOCK_D,
                          HEAD_DIM, MASK)
        kt = tl.trans(k)
    else:
        kt = tl.load(k_cache_ptr + kv_off[None, :] + offs_d[:, None], mask=kt_mask, other=0.0)
        if ROPE_K:
            kt = rotate_key_tile(kt, k_cache_ptr, kv_off, offs_d, offs_n, kt_mask, cos_sin_ptr,
                                 stride_cs, HEAD_DIM, q.dtype)
        elif FP8:
            kt = e4m3_tile(kt, q.dtype, NATIVE_E4M3)
    s = tl.dot(q, kv_operand(kt, q.dtype), input_precision=DOT_PREC) * qk_scale
    if SOFTCAP:
        s = softcap_scores(s, softcap)
    if ALIBI:
        s += slopes[:, None] * (offs_n[None, :] - q_pos[:, None]).to(tl.float32)
    if MASK:
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= q_pos[:, None])
        if WINDOW:
            keep = keep & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if WINDOW:  # a row with no visible key so far: keep p and alpha at 0, not NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if TMA:
        v = e4m3_tile(v_tile, q.dtype, NATIVE_E4M3_V) if FP8 else v_tile
        if MASK:  # stale (or never written) values past the context: p = 0 must stay 0
            v = tl.where((offs_n < n_end)[:, None], v, 0.0)
    elif V_T:
        vt = load_v_transposed(v_cache_ptr, table_row_ptr, n0, n_end, kv_head, stride_kb,
                               BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE)
        if FP8:
            vt = e4m3_tile(vt, q.dtype, NATIVE_E4M3_V)
        v = tl.trans(kv_operand(vt, q.dtype))
    elif WORDS and not (FP8 and NATIVE_E4M3_V):
        v = load_kv_words(v_cache_ptr, kv_off, offs_n < n_end, q.dtype, BLOCK_N, BLOCK_D,
                          HEAD_DIM, MASK)
    else:
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=v_mask, other=0.0)
        if FP8:
            v = e4m3_tile(v, q.dtype, NATIVE_E4M3_V)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), kv_operand(v, q.dtype),
                                        input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def load_v_transposed(v_cache_ptr, table_row_ptr, n0, n_end, kv_head, stride_kb,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr):
    """V of keys n0 .. n0 + BLOCK_N as [BLOCK_D, BLOCK_N] (d, keys) from a cache whose
    blocks hold V transposed, [kv_heads, head_dim, block_size] (tokens fastest; the tensor
    [blocks, kv_heads, head_dim, block_size]). Read as [blocks, d, block_size], rows of
    BLOCK_SIZE contiguous values, so the reduction dim of p @ v is contiguous as K's is in
    q @ k^T: a 1-byte V then reaches the MMA by ldmatrix instead of one shared-memory load
    a byte (benchmarks/attn_decode_vt.py). n0 is a multiple of BLOCK_SIZE.
    Whole blocks are read, unmasked (the pipeliner stages them; blocks past the context
    are block 0's): keys past the context get p = 0 but their values must be finite, so
    the engine zeroes a pool it lays out this way (written values are: e4m3 saturates)."""
    NB: tl.constexpr = BLOCK_N // BLOCK_SIZE
    offs_b = tl.arange(0, NB)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_SIZE)
    b_ok = n0 + offs_b * BLOCK_SIZE < n_end
    blk = tl.load(table_row_ptr + n0 // BLOCK_SIZE + offs_b, mask=b_ok, other=0)
    off = (blk.to(tl.int64)[:, None, None] * stride_kb + kv_head * (HEAD_DIM * BLOCK_SIZE)
           + offs_d[None, :, None] * BLOCK_SIZE + offs_s[None, None, :])
    if BLOCK_D != HEAD_DIM:
        v3 = tl.load(v_cache_ptr + off, mask=offs_d[None, :, None] < HEAD_DIM, other=0.0)
    else:
        v3 = tl.load(v_cache_ptr + off)
    return tl.reshape(tl.permute(v3, (1, 0, 2)), [BLOCK_D, BLOCK_N])


@triton.jit
def rotate_key_tile(kt, k_cache_ptr, kv_off, offs_d, offs_n, kt_mask, cos_sin_ptr, stride_cs,
                    HEAD_DIM: tl.constexpr, q_dtype: tl.constexpr):
    """Neox rotary of a transposed key tile kt [D, N] read from a cache of unrotated keys:
    key n at position n (cos_sin [max_pos, HEAD_DIM] = [cos | sin], float32), rounded as
    the reference rotary rounds (table, each product and the sum in the key's dtype). The
    partner half (d +- HEAD_DIM / 2) is a second load of the same cache lines.
    A 1-byte cache's values (k / k_scale, converted by e4m3_tile for e4m3) are
    rotated in q's dtype; the scale, a factor per head, commutes with the rotation."""
    HALF: tl.constexpr = HEAD_DIM // 2
    first = offs_d < HALF
    partner = tl.where(first, offs_d + HALF, offs_d - HALF)
    kp = tl.load(k_cache_ptr + kv_off[None, :] + partner[:, None], mask=kt_mask, other=0.0)
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
        kt, kp = e4m3_tile(kt, q_dtype, NATIVE_E4M3), e4m3_tile(kp, q_dtype, NATIVE_E4M3)
    elif k_cache_ptr.dtype.element_ty == tl.int8:
        kt, kp = kt.to(q_dtype), kp.to(q_dtype)
    col = tl.where(first, offs_d, offs_d - HALF)
    table = cos_sin_ptr + offs_n[None, :].to(tl.int64) * stride_cs + col[:, None]
    dt = kt.dtype
    cos = tl.load(table, mask=kt_mask, other=0.0).to(dt).to(tl.float32)
    sin = tl.load(table + HALF, mask=kt_mask, other=0.0).to(dt).to(tl.float32)
    a = kt.to(tl.float32)
    b = tl.where(first[:, None], -kp.to(tl.float32), kp.to(tl.float32))
    return ((a * cos).to(dt).to(tl.float32) + (b * sin).to(dt).to(tl.float32)).to(dt)


@triton.jit
def e4m3_tile(x, dtype: tl.constexpr, NATIVE: tl.constexpr):
    """e4m3 values as `dtype`: exactly (NATIVE: hardware conversion), or times 2^-8 with
    integer ops; kv_scale returns the matching factor."""
    if NATIVE:
        return x.to(dtype)
    return e4m3_bytes(x, dtype)


@triton.jit
def e4m3_bytes(x, dtype: tl.constexpr):
    """e4m3 values x (any shape) as `dtype` values x * 2^-8, exactly, with integer ops.

    The e4m3 byte s eeee mmm read as float16 bits s 0eeee mmm 0000000 (sign to bit 15,
    the other seven bits shifted up by 7) is its value * 2^-8: float16's exponent bias
    is 15 = 7 + 8 and its subnormals reach 2^-24, below e4m3's least, 2^-9 * 2^-8. So
    normals and subnormals map exactly (448 -> 1.75); NaN (s 1111 111) does not stay NaN,
    and a KV cache never holds it (the writers saturate to +-448).
    """
    b = x.to(tl.uint8, bitcast=True).to(tl.uint32)
    bits = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(dtype)


@triton.jit
def _e4m3_pairs(x):
    """uint32 x with e4m3 bytes in bits 8-15 and 24-31 -> the float16 bits of both (each
    value * 2^-8, see e4m3_bytes), low and high halves: two values per integer op."""
    return (x & 0x80008000) | ((x >> 1) & 0x3F803F80)


@triton.jit
def _half(x, HIGH: tl.constexpr, dtype: tl.constexpr):
    """The float16 in the low or high 16 bits of uint32 x, as `dtype`."""
    if HIGH:
        x = x >> 16
    return x.to(tl.uint16).to(tl.float16, bitcast=True).to(dtype)


@triton.jit
def _word_byte(w, J: tl.constexpr, dtype: tl.constexpr):
    """Byte J (little-endian: the value at d = 4i + J) of int8 words w, as `dtype`."""
    b = ((w << (24 - 8 * J)) >> 24).to(tl.int8)  # arithmetic shift: sign extended
    return b.to(dtype)


@triton.jit
def load_kv_words(cache_ptr, kv_off, n_ok, dtype: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr):
    """Tile [BLOCK_N, BLOCK_D] of a 1-byte cache as `dtype`, read as int32 words; e4m3
    values come scaled by 2^-8 (see e4m3_bytes).

    An operand reduced over tokens (V in p @ v), which are not contiguous in the cache,
    left as bytes is fed to the MMA one shared-memory byte load per value. Here each word
    (4 consecutive d) is split in registers and the four planes interleaved back, so the
    tile reaches the MMA as 16-bit values. e4m3 (K too, transposed by the caller): two
    float16 bit patterns per integer op (_e4m3_pairs on w << 8: d = 4i, 4i + 2; on w:
    4i + 1, 4i + 3), about two integer ops per value in all.
    """
    offs_w = tl.arange(0, BLOCK_D // 4)
    words = cache_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    w_mask = offs_w[None, :] < HEAD_DIM // 4
    if MASK:
        w_mask = n_ok[:, None] & w_mask
    w = tl.load(words + (kv_off // 4)[:, None] + offs_w[None, :], mask=w_mask, other=0)
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        u = w.to(tl.uint32, bitcast=True)
        even = _e4m3_pairs(u << 8)
        odd = _e4m3_pairs(u)
        x = tl.join(tl.join(_half(even, False, dtype), _half(even, True, dtype)),
                    tl.join(_half(odd, False, dtype), _half(odd, True, dtype)))
    elif INT8_KV_F16 and dtype == tl.float16:  # kv_operands: integer ops, no conversions
        u = w.to(tl.uint32, bitcast=True)
        even = int8_word_pairs(u)
        odd = int8_word_pairs(u >> 8)
        x = unbias(tl.join(tl.join(int8_halves(even, False), int8_halves(even, True)),
                           tl.join(int8_halves(odd, False), int8_halves(odd, True))))
    else:
        x = tl.join(tl.join(_word_byte(w, 0, dtype), _word_byte(w, 2, dtype)),
                    tl.join(_word_byte(w, 1, dtype), _word_byte(w, 3, dtype)))
    return tl.reshape(x, [BLOCK_N, BLOCK_D])  # [n, i, k, s] holds d = 4i + 2k + s


@triton.jit
def kv_scale(k_cache_ptr, scale_ptr, kv_head, NATIVE: tl.constexpr):
    """The factor a 1-byte cache's values take back: scale[kv_head], times 2^8 for e4m3 on
    the integer path (whose tiles come as value * 2^-8)."""
    s = tl.load(scale_ptr + kv_head)
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv and not NATIVE:
        s = s * 256.0
    return s


def v_transposed(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether v_cache holds V transposed inside each block, [blocks, kv_heads, head_dim,
    block_size] beside k_cache [blocks, block_size, kv_heads, head_dim] (the engine's
    KILN_KV_V_TRANSPOSED layout: the same bytes a block, viewed another way). The shape
    says which; the strides are checked (the usual layout: K's; transposed: contiguous,
    the kernels derive V's from the sizes)."""
    if v_cache.shape == k_cache.shape:
        assert k_cache.stride() == v_cache.stride(), (k_cache.stride(), v_cache.stride())
        return False
    blocks, block_size, kv_heads, head_dim = k_cache.shape
    assert v_cache.shape == (blocks, kv_heads, head_dim, block_size), (k_cache.shape,
                                                                        v_cache.shape)
    assert v_cache.is_contiguous() and k_cache.stride(0) == v_cache.stride(0), \
        (k_cache.stride(), v_cache.stride())
    return True


def check_v_tiles(v_t: bool, block_n: int, block_size: int, sliding_window: int | None,
                  key_rotary: torch.Tensor | None) -> None:
    """A transposed V is read a whole block at a time from tile starts on block
    boundaries: tiles of whole blocks, no window, no sinks (the engine lays such layers out
    the usual way)."""
    assert not v_t or (sliding_window is None and key_rotary is None and
                       block_n % block_size == 0), "V transposed: tiles of whole blocks"


def dot_precision(dtype: object) -> str:
    """float32 inputs get exact products (the reference's numerics); 16-bit ones use MMA."""
    return "ieee" if dtype == torch.float32 else "tf32"


def head_block(head_dim: int) -> int:
    """Head dims that are not a power of two are padded (and masked) up to one."""
    return max(16, triton.next_power_of_2(head_dim))


def kv_scale_args(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale pointers a kernel takes: float32 [kv_heads] scales for a 1-byte cache, or a
    placeholder that is never read (the kernels branch on the cache's element type at
    compile time, so a 16/32-bit cache compiles to the same code as without scales).

    Checks shapes and dtypes only: nothing is read from the device (CUDA-graph safe).
    """
    assert k_cache.dtype == v_cache.dtype, (k_cache.dtype, v_cache.dtype)
    if k_cache.dtype not in KV_QUANT_DTYPES:
        assert k_cache.element_size() > 1, f"unsupported KV cache dtype {k_cache.dtype}"
        return k_cache, v_cache
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if head_dim % 4 == 0:  # attend_tile may read a tile as int32 words (load_kv_words)
        assert all(all(x % 4 == 0 for x in c.stride()[:-1]) and c.data_ptr() % 4 == 0
                   for c in (k_cache, v_cache)), \
            "a 1-byte KV cache with head_dim % 4 == 0 needs 4-byte aligned rows"
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        assert s is not None, f"a {k_cache.dtype} KV cache needs {name}"
        assert (s.dtype == torch.float32 and s.numel() == num_kv_heads and s.is_contiguous()
                and s.device == k_cache.device), \
            f"{name}: want float32 [{num_kv_heads}] contiguous on {k_cache.device}"
    return k_scale, v_scale
