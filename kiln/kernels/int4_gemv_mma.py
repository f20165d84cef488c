"""The one-row int4 GEMV with its products on the tensor cores (`mma.sync`), in Gluon: an
experiment of the 58th session, opt-in (KILN_INT4_GEMV_MMA=1, groups of 128), untimed.

Why: kiln's one-row GEMVs (kiln.kernels.int_gemv_pairs, int4_gemv_tma) spend 27-33 SASS
instructions a weight word (eight int4 values) in their K loops, and the sm_90 cores issue
about one warp instruction a cycle each. At ~1 word a warp instruction an H100 runs out of
issue slots near its copy bandwidth, and an H200 (43% more bandwidth, the same SMs) gains
only 7% at batch 1 (425.5 against 397 tok/s): the GEMVs are bound by instructions, not
bytes. Here a word costs its unpacking (a shift, four byte selections, four masks: 9) and
two `mma.sync.m16n8k16` (bfloat16, float32 sums; one for its products, one for x's sum):
the products, their sums across lanes and the base's subtraction (below) leave the ALUs:
15-19 instructions a word in all (sm_90 SASS), 13-16 with two tiles a warp (below).

The layout. A warp takes 16 weight rows: lane 4g + t holds rows g and g + 8 (the mma's
A fragment rows) and, for each 128-value chunk of K (a group of 128), words 4t .. 4t + 3
of both rows (16 bytes each). Word 4t + e of the two rows is the A fragment of element e's
two mmas (its bfloat16 pairs 0, 1 and 2, 3), and x's pairs of the same word are the B
fragment, the same in every column n: so C[row, n] is row's dot product for every n, and
every lane ends with rows g and g + 8 complete, no shuffles. With two m16 tiles a warp
(TILES 2) a lane also holds rows g + 16 and g + 24, and x's pairs (and their sums) serve
twice the words. (A dot product does not
depend on the order of its K terms, so any assignment of a chunk's words to the mma's K
positions works while A and B agree, as here lane by lane.)

The base. The words unpack to bfloat16 2^7 + q (exact: kiln.kernels.int_pairs_asm) and
are not shifted back: D = sum (128 + q) x = sum q x + 128 X over a chunk, X = sum x (a
second mma with A all ones), so for a weight s q + o (asymmetric) the chunk adds
s D + (o - 128 s) X, and s (q - 8) (symmetric) s D - 136 s X. The float32 sums keep
about 20 bits after the cancellation (128 X against sum q x), more than the bfloat16-pair
products of the pairs GEMV.

K splits meet in the kernel (kiln.kernels.split_k's protocol). GPU tests:
tests/test_int4_gemv_mma.py; timed by benchmarks/int_wgmma_bench.py --gemv-tma (the
"mma" launch).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from kiln.kernels import pdl
from kiln.kernels.gluon_sync import gluon_start, split_k_sum
from kiln.kernels.int_pairs_asm import _UNPACK_128
from kiln.kernels.split_k import split_k_counters

# launched with PDL behind the kernel before, as the other one-row GEMVs are
# (KILN_INT4_GEMV_MMA_PDL=0: not)
PDL = os.environ.get("KILN_INT4_GEMV_MMA_PDL", "1") != "0"
_CHUNK = 128  # K values a step: one group of 128, 16 words a row
CHUNK = gl.constexpr(_CHUNK)

# A word W (value i at bits 4i) -> bfloat16 pairs Pk (values 2k, 2k + 1) of 2^7 + q
_UNPACK = re.sub(r"\bm(\d)\b", r"P\1", _UNPACK_128)
_MMA = ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {D0, D1, D2, D3}, "
        "{A0, A1, A2, A3}, {B0, B1}, {D0, D1, D2, D3};\n")


def _mma(a: tuple[str, ...], b: tuple[str, str], d: str) -> str:
    text = _MMA
    for i, reg in enumerate(a):
        text = text.replace(f"A{i}", reg)
    text = text.replace("B0", b[0]).replace("B1", b[1])
    for i in range(4):
        text = text.replace(f"D{i}", f"{d}{i}")
    return text


def _chunk_asm(base: int, tiles: int) -> str:
    """One lane's chunk (pack=4): y ($0..$3: rows g + 8 i, i < 2 tiles; the others passed
    through) += the chunk's dot products, scaled. Inputs: y ($4..$7); the four words of
    rows g, g + 8 (, g + 16, g + 24) ($8 on, a row's four together); x's four pairs of
    each word (16, word-major); (s, o) of rows g and g + 8 (, of g + 16 and g + 24).
    base: 128 (asymmetric: o - 128 s) or 136 (symmetric)."""
    xs, ss = 8 + 8 * tiles, 24 + 8 * tiles  # x's and the scales' first operands
    body = [".reg .b32 w4, P0, P1, P2, P3, Q0, Q1, Q2, Q3, one;",
            ".reg .f32 d0, d1, d2, d3, f0, f1, f2, f3, e0, e1, e2, e3, c, k;",
            "mov.b32 one, 0x3F803F80;"]
    body += [f"mov.f32 {r}{i}, 0f00000000;" for r in "dfe" for i in range(4)]
    for e in range(4):
        x = [f"${xs + 4 * e + j}" for j in range(4)]
        for tile, acc in zip(range(tiles), "df"):  # rows g + 16 tile, + 8: the A rows
            body.append(_UNPACK.replace("W", f"${8 + 8 * tile + e}"))
            body.append(_UNPACK.replace("W", f"${12 + 8 * tile + e}").replace("P", "Q"))
            body.append(_mma(("P0", "Q0", "P1", "Q1"), (x[0], x[1]), acc))
            body.append(_mma(("P2", "Q2", "P3", "Q3"), (x[2], x[3]), acc))
    for e in range(4):  # X, back to back (one ones quad)
        body.append(_mma(("one",) * 4, (f"${xs + 4 * e}", f"${xs + 1 + 4 * e}"), "e"))
        body.append(_mma(("one",) * 4, (f"${xs + 2 + 4 * e}", f"${xs + 3 + 4 * e}"), "e"))
    body.append(f"mov.f32 k, 0f{struct.unpack('<I', struct.pack('<f', -base))[0]:08X};")
    for i in range(2 * tiles):  # row g + 8 i: C row g (+ 8) of tile i // 2
        s, o, d = f"${ss + 2 * i}", f"${ss + 2 * i + 1}", "df"[i // 2] + "02"[i % 2]
        offset = f"fma.rn.f32 c, k, {s}, {o};" if base == 128 else f"mul.rn.f32 c, k, {s};"
        body += [offset, f"fma.rn.f32 ${i}, {s}, {d}, ${4 + i};",
                 f"fma.rn.f32 ${i}, c, e0, ${i};"]
    body += [f"mov.b32 ${i}, ${4 + i};" for i in range(2 * tiles, 4)]
    return "{\n" + "\n".join(body) + "\n}"


_ASYM = gl.constexpr(_chunk_asm(128, 1))
_SYM = gl.constexpr(_chunk_asm(136, 1))
_ASYM2 = gl.constexpr(_chunk_asm(128, 2))
_SYM2 = gl.constexpr(_chunk_asm(136, 2))
# y; the rows' words; x's pairs; scales and offsets: 4 values each, y out
_OPERANDS = gl.constexpr(",".join(["=f"] * 4 + ["f"] * 4 + ["r"] * 24 + ["f"] * 4))
_OPERANDS2 = gl.constexpr(",".join(["=f"] * 4 + ["f"] * 4 + ["r"] * 32 + ["f"] * 8))


@gluon.jit
def _axis(n: gl.constexpr, dim: gl.constexpr, L: gl.constexpr):
    """arange(n) along dim of the 4-D layout L, expanded to 4-D."""
    if dim == 0:
        a = gl.arange(0, n, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(
            3, L))))[:, None, None, None]
    elif dim == 1:
        a = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(
            3, L))))[None, :, None, None]
    elif dim == 2:
        a = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(
            3, L))))[None, None, :, None]
    else:
        a = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(
            2, L))))[None, None, None, :]
    return a


@gluon.jit
def _weight_loads(w_ptr, s_ptr, o_ptr, c, rows, rows8, t, j, stride_wn, stride_sn,
                  HAS_OFFSET: gl.constexpr):
    """Chunk c's weights for each lane (all [W, 8, 4, 4], the last dim in the lane): rows
    g and g + 8's words 4t .. 4t + 3, and (s, o) of row g then of row g + 8. No masks:
    rows past N are clamped to N - 1 by the caller (their sums are not stored)."""
    words = c * (CHUNK // 8) + 4 * t + j
    wg = gl.load(w_ptr + rows.to(gl.int64) * stride_wn + words)
    wg8 = gl.load(w_ptr + rows8.to(gl.int64) * stride_wn + words)
    srow = gl.where(j < 2, rows, rows8).to(gl.int64) * stride_sn + c
    if HAS_OFFSET:
        sc = gl.load(gl.where(j % 2 == 0, s_ptr, o_ptr) + srow)
    else:
        sc = gl.load(s_ptr + srow)
    return wg, wg8, sc


@gluon.jit
def _x_loads(x_ptr, c, t, j):
    """x's pairs of the lane's words of chunk c (word 4t + e: pairs 16 t + 4 e + j of the
    chunk's 64), one operand a word e."""
    pairs = x_ptr + c * (CHUNK // 2) + 16 * t + j
    return gl.load(pairs), gl.load(pairs + 4), gl.load(pairs + 8), gl.load(pairs + 12)


@gluon.jit
def _chunk(y, w0, w8, w16, w24, x0, x1, x2, x3, sc, sc16, HAS_OFFSET: gl.constexpr,
           TILES: gl.constexpr):
    """y plus one chunk's scaled dot products (_chunk_asm), every lane together (TILES 1:
    w16, w24 and sc16 unused)."""
    if TILES == 2:
        if HAS_OFFSET:
            y = gl.inline_asm_elementwise(_ASYM2, _OPERANDS2, [y, w0, w8, w16, w24, x0, x1, x2,
                                                               x3, sc, sc16],
                                          dtype=gl.float32, is_pure=False, pack=4)
        else:
            y = gl.inline_asm_elementwise(_SYM2, _OPERANDS2, [y, w0, w8, w16, w24, x0, x1, x2,
                                                              x3, sc, sc16],
                                          dtype=gl.float32, is_pure=False, pack=4)
    elif HAS_OFFSET:
        y = gl.inline_asm_elementwise(_ASYM, _OPERANDS, [y, w0, w8, x0, x1, x2, x3, sc],
                                      dtype=gl.float32, is_pure=False, pack=4)
    else:
        y = gl.inline_asm_elementwise(_SYM, _OPERANDS, [y, w0, w8, x0, x1, x2, x3, sc],
                                      dtype=gl.float32, is_pure=False, pack=4)
    return y


@gluon.jit
def _tile_loads(w_ptr, s_ptr, o_ptr, c, r0, r8, r16, r24, t, j, stride_wn, stride_sn,
                HAS_OFFSET: gl.constexpr, TILES: gl.constexpr):
    """Chunk c's weights of both tiles' rows (_weight_loads); TILES 1: the second tile's
    are the first's (unused)."""
    w0, w8, sc = _weight_loads(w_ptr, s_ptr, o_ptr, c, r0, r8, t, j, stride_wn, stride_sn,
                               HAS_OFFSET)
    if TILES == 2:
        w16, w24, sc16 = _weight_loads(w_ptr, s_ptr, o_ptr, c, r16, r24, t, j, stride_wn,
                                       stride_sn, HAS_OFFSET)
    else:
        w16, w24, sc16 = w0, w8, sc
    return w0, w8, w16, w24, sc, sc16


@gluon.jit
def _w4_gemv_mma_kernel(w_ptr, x_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, part_ptr, count_ptr,
                        N, K, stride_wn, stride_sn, CHUNKS_PER_SPLIT,
                        HAS_OFFSET: gl.constexpr, HAS_BIAS: gl.constexpr,
                        SPLIT_K: gl.constexpr, PDL: gl.constexpr = False,
                        TILES: gl.constexpr = 1):
    """out[0, N] = x [1, K] @ dequant(w)^T (+ bias): w int4 words (int32 [N, K / 8]),
    float32 scales and offsets [N, K / 128], x bfloat16 pairs (int32 [K / 2]); 16 TILES
    rows a warp (program_id(0); TILES 2: a lane's rows g, g + 8, g + 16, g + 24, x's pairs
    shared by twice the words), K split CHUNKS_PER_SPLIT chunks of 128 a program
    (program_id(1)). PDL (launched with PDL): the first chunk's weights are loaded before
    the wait, x after it."""
    W: gl.constexpr = gl.num_warps()
    L: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 8, 4, 1], [W, 1, 1, 1], [3, 2, 1, 0])
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    rows = pid_n * (16 * TILES * W) + 16 * TILES * _axis(W, 0, L) + _axis(8, 1, L)  # row g
    t = _axis(4, 2, L)
    j = _axis(4, 3, L)
    rows = rows + 0 * (t + j)  # (to [W, 8, 4, 4])
    t = t + 0 * rows
    j = j + 0 * rows
    # (rows past N load row N - 1's words; their sums are not stored)
    r0, r8 = gl.minimum(rows, N - 1), gl.minimum(rows + 8, N - 1)
    r16, r24 = gl.minimum(rows + 16, N - 1), gl.minimum(rows + 24, N - 1)
    c0 = pid_k * CHUNKS_PER_SPLIT
    c1 = gl.minimum(c0 + CHUNKS_PER_SPLIT, K // CHUNK)
    y = gl.zeros([W, 8, 4, 4], gl.float32, layout=L)
    # two chunks a trip (no register copies between trips): chunk c + 1's loads in
    # flight during chunk c's products, c + 2's during c + 1's
    w0, w8, w16, w24, sc, sc16 = _tile_loads(w_ptr, s_ptr, o_ptr, c0, r0, r8, r16, r24, t, j,
                                             stride_wn, stride_sn, HAS_OFFSET, TILES)
    if PDL:  # launched with PDL: the first weights load while the kernel before finishes
        gluon_start()
    x0, x1, x2, x3 = _x_loads(x_ptr, c0, t, j)
    for c in range(c0, c1, 2):
        nc = gl.minimum(c + 1, c1 - 1)
        v0, v8, v16, v24, vsc, vsc16 = _tile_loads(w_ptr, s_ptr, o_ptr, nc, r0, r8, r16, r24,
                                                   t, j, stride_wn, stride_sn, HAS_OFFSET,
                                                   TILES)
        u0, u1, u2, u3 = _x_loads(x_ptr, nc, t, j)
        y = _chunk(y, w0, w8, w16, w24, x0, x1, x2, x3, sc, sc16, HAS_OFFSET, TILES)
        nc = gl.minimum(c + 2, c1 - 1)
        w0, w8, w16, w24, sc, sc16 = _tile_loads(w_ptr, s_ptr, o_ptr, nc, r0, r8, r16, r24, t,
                                                 j, stride_wn, stride_sn, HAS_OFFSET, TILES)
        x0, x1, x2, x3 = _x_loads(x_ptr, nc, t, j)
        # past the split's last chunk (c + 1 == c1: chunk c1 - 1 again) it adds nothing:
        # s and o zeroed (no branch: the compiler would sink the loads into it)
        live = (c + 1 < c1).to(gl.float32)
        y = _chunk(y, v0, v8, v16, v24, u0, u1, u2, u3, vsc * live, vsc16 * live, HAS_OFFSET,
                   TILES)
    # row g + 8 i's sum in slot i, the same in each of the four lanes t
    r = gl.sum(gl.where(j == 0, rows, 0), axis=3)
    first = gl.sum(gl.where(j == 0, t, 0), axis=3) == 0  # one lane of the four stores
    for i in gl.static_range(2 * TILES):
        _store_rows(gl.sum(gl.where(j == i, y, 0.0), axis=3), r + 8 * i, first, bias_ptr,
                    out_ptr, part_ptr, count_ptr, N, 2 * TILES * pid_n + i, pid_k, HAS_BIAS,
                    SPLIT_K)


@gluon.jit
def _store_rows(y, rows, first, bias_ptr, out_ptr, part_ptr, count_ptr, N, slot, pid_k,
                HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr):
    """y [W, 8, 4] of rows (lanes `first` store) into out, after the other K splits'
    partial sums (kiln.kernels.split_k's protocol: partials, a fence, the count; the last
    program of the row block adds them in split order and zeroes the counter at slot: the
    two row halves count separately)."""
    mask = first & (rows < N)
    last = True
    if SPLIT_K > 1:
        y, last = split_k_sum(y, part_ptr, rows, mask, N, pid_k, count_ptr, slot, rows,
                              SPLIT_K)
    if last:
        if HAS_BIAS:
            y += gl.load(bias_ptr + rows, mask=mask, other=0.0).to(gl.float32)
        gl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class GemvMmaConfig:
    """A launch: warps a program, K splits, m16 tiles a warp (16 rows each)."""
    num_warps: int = 4
    split_k: int = 1
    tiles: int = 1


def gemv_mma_config(N: int, K: int, sms: int = 132, tiles: int = 1) -> GemvMmaConfig:
    """K split until the programs fill about two waves of the SMs, two chunks a split at
    least (untimed: a guess to be swept, benchmarks/int_wgmma_bench.py --gemv-tma)."""
    cfg = GemvMmaConfig(tiles=tiles)
    blocks = triton.cdiv(N, 16 * tiles * cfg.num_warps)
    chunks = K // _CHUNK
    split = 1
    while blocks * split * 2 <= 2 * sms and chunks // (split * 2) >= 2:
        split *= 2
    return GemvMmaConfig(cfg.num_warps, split, tiles)


def gemv_mma_eligible(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """One bfloat16 row on Hopper (sm_90: mma.sync, any sm_80+ would do), int4 words in
    groups of 128, K in whole groups, contiguous rows of words and scales."""
    M, K = x.shape
    return M == 1 and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9 and \
        x.dtype == torch.bfloat16 and weight.dtype == torch.uint8 and \
        scale.dtype == torch.float32 and K % _CHUNK == 0 and K // scale.shape[1] == _CHUNK and \
        x.is_contiguous() and weight.stride(1) == 1 and weight.stride(0) % 16 == 0 and \
        scale.stride(1) == 1


def w4_gemv_mma(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                offset: torch.Tensor | None, bias: torch.Tensor | None,
                config: GemvMmaConfig | None = None, glu: int = 0,
                rope: object = None) -> torch.Tensor | None:
    """x [1, K] bfloat16 @ dequant(int4 weight [N, K / 2] uint8, float32 scales and
    offsets [N, K / 128])^T (+ bias) -> [1, N] bfloat16 (gemv_mma_eligible operands).
    No epilogues: None where glu or rope asks for one (the caller runs them unfused)."""
    if glu or rope is not None:
        return None
    _, K = x.shape
    N = weight.shape[0]
    cfg = config or gemv_mma_config(N, K)
    chunks = K // _CHUNK
    per_split = triton.cdiv(chunks, max(1, min(cfg.split_k, chunks)))
    split = triton.cdiv(chunks, per_split)
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    blocks = triton.cdiv(N, 16 * cfg.tiles * cfg.num_warps)
    part, counters = (torch.empty(split, N, dtype=torch.float32, device=x.device),
                      split_k_counters(x.device, 2 * cfg.tiles * blocks)) if split > 1 else \
        (out, out)
    words = weight.view(torch.int32)
    use_pdl = PDL and pdl.INT_GEMV and pdl.hopper(x)
    _w4_gemv_mma_kernel[(blocks, split)](
        words, x.view(torch.int32), scale, offset if offset is not None else scale,
        bias if bias is not None else scale, out, part, counters, N, K, words.stride(0),
        scale.stride(0), per_split, HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None,
        SPLIT_K=split, PDL=use_pdl, TILES=cfg.tiles, num_warps=cfg.num_warps,
        **pdl.launch_args(use_pdl))
    return out


w4_gemv_mma.epilogues = False  # (kiln.layers.weight_only: GLU and rotary unfused)
