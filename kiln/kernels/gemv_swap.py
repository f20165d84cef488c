"""16-bit decode linear (M <= 16 tokens) with the operands swapped, and the kernel before
it folded into its prologue: RMSNorm (with the residual add) or act(gate) * up.

    out^T[n, m] = sum_k w[n, k] * a[m, k],  a = prologue(x)

The weight's rows are the tensor core's M (a 64-row wgmma per warp group on Hopper, read
from shared memory as the weight arrived), the tokens pad to its N (16), as cuBLAS's own
bf16 decode GEMVs do (128 weight rows x 8 tokens, 12 stages on an H200) and as
kiln.kernels.fp8_swap does for e4m3. What cuBLAS cannot do is the prologue:

- NORM_RMS / NORM_ADD_RMS: a = w_norm * rms_norm(x (+ r)). Where K is not split (QKV and
  gate-up), each program reads all of s = x (+ r) anyway: it multiplies w_norm * s into
  the GEMM and sums s * s beside it, and the sums are scaled by 1 / rms at the end
  (LATE_NORM), so nothing waits for the norm. That rounds w_norm * s to the GEMM's dtype
  where kiln.kernels.rms_norm rounds s / rms first and w_norm * (that) after: the GEMM's
  input differs in its last bit, within the dtype's rounding of the result. Otherwise
  (late_norm=False, or K split) a pass before the GEMM takes each row's sum of squares
  (row-wide loads from L2) and each K tile is normalised with rms_norm's roundings. With
  the residual, program 0 also writes s to res_out (a new tensor, so nobody reads what it
  overwrites). The norm kernel's launch is gone.
- ACT_SILU / ACT_GELU_TANH: x is [M, 2I] = [gate | up] and a = act(gate) * up rounded as
  kiln.kernels.silu_mul rounds it: the SiLU*mul launch of the MLP is gone.

The sums of squares are added in another order than the norm kernel's, so the norm's
float32 mean may differ from it in its last bit.
Several K splits meet in the kernel (kiln.kernels.split_k: no zero or reduce launch).

H200, one row (benchmarks/gemv_swap_bench.py, 29th session): the plain kernel beats cuBLAS
at every Llama-3.1-8B shape (QKV 14.4 vs 15.1 us, O 11.0 vs 13.2, gate-up 55.8 vs 55.9-62.5,
down 30.1 vs 32.1) and is the default for 16-bit decode linears (kiln.layers.swap_input:
batch 1 +4.2%); the prologues cost about what the kernels they replace did (QKV with its
norm 18.9 vs 18.9 unfused, gate-up 65.1 vs 62.8, down with SiLU*mul 33.2 vs 33.7), so they
stay opt-in (KILN_BF16_SWAP=fused).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from kiln.kernels import pdl, rotary_kv
from kiln.kernels.gemv_swap_rope import RopeArgs, launch_shape, rope_epilogue, rope_rows
from kiln.kernels.pdl import pdl_start
from kiln.kernels.silu_mul import _act_mul, act_mul_values, glu_rows
from kiln.kernels.split_k import split_k_counters, split_k_fixup

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ROWS = 16  # the tokens' tile (N of the MMA)
NORM_NONE, NORM_RMS, NORM_ADD_RMS = 0, 1, 2
ACT_NONE, ACT_SILU, ACT_GELU_TANH = 0, 1, 2
# the norm's 1 / rms applied to the GEMM's sums at the end where K is not split (module doc)
LATE_NORM = os.environ.get("KILN_SWAP_LATE_NORM", "1") != "0"


@dataclasses.dataclass(frozen=True)
class SwapConfig:
    block_w: int = 64  # weight rows a program (swap_config picks the launch)
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 6
    split_k: int = 1

    def tag(self) -> str:
        return (f"{self.block_w}x{self.block_k}w{self.num_warps}s{self.num_stages}"
                f"k{self.split_k}")


def swap_config(M: int, N: int, K: int, elem: int = 2) -> SwapConfig:
    """The launch for [M <= 16, K] x [N, K]^T. The best of 31-40 launches a shape at one
    row (H200, 29th session, benchmarks/gemv_swap_bench.py --grid, us; cuBLAS beside):
    QKV 6144 x 4096 64 x 128, 6 stages 14.63 (15.16), O 4096 x 4096 8 stages 11.06 (13.14),
    gate-up 28672 x 4096 4 stages 56.28 (57.35), down 4096 x 14336 6 stages in 2 K splits
    30.54 (32.22)."""
    stages = 4 if N >= 16384 else 8 if N <= 4096 and K <= 4096 else 6
    # elem: bytes a weight; a stage holds 64 weight rows and up to 32 rows of x and r
    stages = max(2, min(stages, 160 * 1024 // ((64 + 32) * 128 * elem)))
    return SwapConfig(64, 128, 4, stages, 2 if K >= 8192 else 1)


@triton.jit
def _norm_input(x_rows, r_rows, offs, mask, NORM: tl.constexpr):
    """s = x (+ r), rounded to x's dtype as kiln.kernels.rms_norm rounds it (offs: column
    offsets, broadcast against the row pointers)."""
    x = tl.load(x_rows + offs, mask=mask, other=0.0)
    if NORM == 2:
        r = tl.load(r_rows + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _prologue(x_rows, r_rows, nw_ptr, offs, kmask, mask, inv_rms, inter,
              NORM: tl.constexpr, ACT: tl.constexpr):
    """prologue(x) at the given rows (pointers) and columns offs (broadcast), in float32
    (exact: what is rounded to the GEMM's dtype next is)."""
    if ACT != 0:
        a = _act_mul(x_rows, offs, mask, inter, ACT == 2).to(tl.float32)
    elif NORM != 0:
        s = _norm_input(x_rows, r_rows, offs, mask, NORM)
        normed = (s.to(tl.float32) * inv_rms).to(s.dtype).to(tl.float32)
        a = normed * tl.load(nw_ptr + offs, mask=kmask, other=0.0).to(tl.float32)
    else:
        a = tl.load(x_rows + offs, mask=mask, other=0.0).to(tl.float32)
    return a


@triton.jit
def _gemm_input(x_rows, r_rows, nw_ptr, offs_k, mask_t, inv_rms, inter, K,
                EVEN_K: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr,
                A_DTYPE: tl.constexpr):
    """The GEMM's [BLOCK_T, BLOCK_K] input tile a = prologue(x) at columns offs_k."""
    kmask = offs_k < K
    if NORM == 0 and ACT == 0:  # as loaded (straight into shared memory by cp.async)
        if EVEN_K:
            a = tl.load(x_rows + offs_k[None, :], mask=mask_t[:, None], other=0.0)
        else:
            a = tl.load(x_rows + offs_k[None, :], mask=mask_t[:, None] & kmask[None, :],
                        other=0.0)
    else:  # loaded as [BLOCK_T, BLOCK_K] tiles (cp.async, pipelined as the weight is)
        if EVEN_K:
            mask = mask_t[:, None]
        else:
            mask = mask_t[:, None] & kmask[None, :]
        a = _prologue(x_rows, r_rows, nw_ptr, offs_k[None, :], kmask[None, :], mask,
                      inv_rms[:, None], inter, NORM, ACT)
    return a.to(A_DTYPE)


@triton.jit
def _late_norm_input(x_rows, r_rows, nw_ptr, res_out_ptr, stride_ro, offs_k, offs_t, mask_t,
                     pid_w, K, NORM: tl.constexpr, A_DTYPE: tl.constexpr):
    """(a = w_norm * s, s * s) at columns offs_k, s = x (+ r) (stored by the first program):
    the norm's 1 / rms is applied to the GEMM's sums at the end (LATE_NORM)."""
    kmask = offs_k < K
    # the norm weight as a [BLOCK_T, BLOCK_K] tile of equal rows: pipelined with the rest
    nw = tl.load(nw_ptr + offs_t[:, None] * 0 + offs_k[None, :], mask=kmask[None, :],
                 other=0.0).to(tl.float32)
    mask = mask_t[:, None] & kmask[None, :]
    s2 = _norm_input(x_rows, r_rows, offs_k[None, :], mask, NORM)
    if NORM == 2:
        tl.store(res_out_ptr + offs_t.to(tl.int64)[:, None] * stride_ro + offs_k[None, :],
                 s2, mask=mask & (offs_t * 0 + pid_w == 0)[:, None])
    sf = s2.to(tl.float32)
    a = (sf * nw).to(A_DTYPE)
    sq = sf * sf
    return a, sq


@triton.jit(do_not_specialize=["M"])
def _gemv_swap_kernel(x_ptr, r_ptr, nw_ptr, res_out_ptr, w_ptr, bias_ptr, out_ptr, part_ptr,
                      count_ptr, M, N, K, stride_xm, stride_rm, stride_ro, stride_wn,
                      stride_om, eps,
                      NORM: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                      NORM_BLOCK: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                      SPLIT_K: tl.constexpr, LATE_NORM: tl.constexpr, PRE_PASS: tl.constexpr,
                      INTERPRET: tl.constexpr, PDL: tl.constexpr = False,
                      GLU: tl.constexpr = 0,
                      pos_ptr=None, cs_ptr=None, kc_ptr=None, vc_ptr=None, slot_ptr=None,
                      num_heads=0, num_kv_heads=0, block_size=1, stride_cs=0, stride_cb=0,
                      stride_cslot=0, stride_ch=0, stride_vs=0, stride_vh=0, stride_vd=0,
                      ROPE_HALF: tl.constexpr = 0):
    """acc[BLOCK_W weight rows, BLOCK_T tokens] over the program's share of K (program_id(1)
    of SPLIT_K), then out[token, row] = acc (+ bias[row]) in out's dtype. K here is the
    GEMM's (the intermediate size I for ACT, x then being [M, 2I]).
    PDL (launched with PDL): waits for the kernel before, then lets the one after start.
    GLU (1 SiLU, 2 tanh GELU): w is [2N, K] = [gate | up] and out[token, j] = act(gate_j) *
    up_j for j < N: a program's 64 rows are the 32 gate rows and the 32 up rows of its 32
    columns, and the epilogue rounds both as stored and multiplies them as
    kiln.kernels.silu_mul does (the SiLU*mul launch after the gate-up GEMV is gone).
    ROPE_HALF (head_dim / 2): w is the fused QKV weight, out is q's [M, num_heads *
    head_dim]; rotary and the KV-cache write in the epilogue (kiln.kernels.gemv_swap_rope)."""
    pid_w = tl.program_id(0)
    pid_k = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_W // 2
    if GLU != 0:  # rows r < HALF: gate, the rest: up, of columns pid_w * HALF + r % HALF
        offs_w, mask_w = glu_rows(pid_w, N, BLOCK_W)
    elif ROPE_HALF > 0:  # 32 dims of a head's first half, then the 32 they rotate with
        offs_w = rope_rows(pid_w, ROPE_HALF, BLOCK_W)
        mask_w = offs_w < N
    else:
        offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
        mask_w = offs_w < N
    NW = N * 2 if GLU != 0 else N  # the weight's rows
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    mask_t = offs_t < M
    w_rows = w_ptr + offs_w.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xm
    r_rows = r_ptr + offs_t.to(tl.int64)[:, None] * stride_rm
    A_DTYPE: tl.constexpr = w_ptr.dtype.element_ty
    # float32 weights (tests: engines compared with cuBLAS's float32 GEMMs) in full precision
    DOT_PREC: tl.constexpr = "ieee" if A_DTYPE == tl.float32 else "tf32"
    k_len = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = pid_k * k_len
    pdl_start(PDL)  # x (and r) come from the kernel before

    inv_rms = tl.zeros([BLOCK_T], dtype=tl.float32)
    sq_acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    if PRE_PASS:  # the rows' sums of squares; program (0, 0) writes s = x + r
        offs_n = tl.arange(0, NORM_BLOCK)
        first = (offs_n * 0 + pid_w + pid_k) == 0
        ss = tl.zeros([BLOCK_T], dtype=tl.float32)
        for m in range(0, M):  # a row at a time, in loads as wide as the row (<= 4096)
            sq = tl.zeros([NORM_BLOCK], dtype=tl.float32)
            for k in range(0, K, NORM_BLOCK):
                cols = k + offs_n
                s = _norm_input(x_ptr + m * stride_xm, r_ptr + m * stride_rm, cols,
                                cols < K, NORM)
                if NORM == 2:
                    tl.store(res_out_ptr + m * stride_ro + cols, s, mask=(cols < K) & first)
                sf = s.to(tl.float32)
                sq += sf * sf
            ss = tl.where(offs_t == m, tl.sum(sq, axis=0), ss)
        inv_rms = tl.rsqrt(ss / K + eps)

    acc = tl.zeros([BLOCK_W, BLOCK_T], dtype=tl.float32)
    for k in range(k_start, tl.minimum(k_start + k_len, K), BLOCK_K):
        if EVEN_K and EVEN_N:
            w = tl.load(w_rows + (k + offs_k)[None, :])
        elif EVEN_K:
            w = tl.load(w_rows + (k + offs_k)[None, :], mask=mask_w[:, None], other=0.0)
        else:
            w = tl.load(w_rows + (k + offs_k)[None, :],
                        mask=mask_w[:, None] & ((k + offs_k) < K)[None, :], other=0.0)
        if LATE_NORM:
            a, sq_k = _late_norm_input(x_rows, r_rows, nw_ptr, res_out_ptr, stride_ro,
                                       k + offs_k, offs_t, mask_t, pid_w, K, NORM, A_DTYPE)
            sq_acc += sq_k
        else:
            a = _gemm_input(x_rows, r_rows, nw_ptr, k + offs_k, mask_t, inv_rms, K, K,
                            EVEN_K, NORM, ACT, A_DTYPE)
        acc = tl.dot(w, tl.trans(a), acc, input_precision=DOT_PREC)
    if LATE_NORM:  # 1 / rms of each row, from the sums of squares of its whole s
        acc = acc * tl.rsqrt(tl.sum(sq_acc, axis=1) / K + eps)[None, :]

    out_mask = mask_w[:, None] & mask_t[None, :]
    if SPLIT_K > 1:
        acc, last = split_k_fixup(acc, part_ptr, count_ptr, pid_w,
                                  offs_t.to(tl.int64)[None, :] * NW + offs_w[:, None],
                                  out_mask, M * NW, offs_w, SPLIT_K, INTERPRET)
    else:
        last = True
    if last:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_w, mask=mask_w, other=0.0).to(tl.float32)[:, None]
        y = acc.to(out_ptr.dtype.element_ty)
        if GLU != 0:  # [gate; up] rows -> act(gate) * up, as silu_mul on the stored GEMM
            gate, up = tl.split(tl.permute(tl.reshape(y, [2, HALF, BLOCK_T]), [1, 2, 0]))
            cols_h = pid_w * HALF + tl.arange(0, HALF)
            tl.store(out_ptr + offs_t.to(tl.int64)[None, :] * stride_om + cols_h[:, None],
                     act_mul_values(gate, up, GLU == 2),
                     mask=(cols_h < N)[:, None] & mask_t[None, :])
        elif ROPE_HALF > 0:
            rope_epilogue(y, pid_w, offs_t, mask_t, out_ptr, stride_om, pos_ptr, cs_ptr,
                          kc_ptr, vc_ptr, slot_ptr, num_heads, num_kv_heads, block_size,
                          stride_cs, stride_cb, stride_cslot, stride_ch, stride_vs,
                          stride_vh, stride_vd, ROPE_HALF, BLOCK_W, BLOCK_T)
        else:
            tl.store(out_ptr + offs_t.to(tl.int64)[None, :] * stride_om + offs_w[:, None], y,
                     mask=out_mask)


def gemv_swap(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
              residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
              eps: float = 1e-6, act: int = ACT_NONE, config: SwapConfig | None = None,
              res_out: torch.Tensor | None = None, late_norm: bool = LATE_NORM,
              pdl_launch: bool | None = None, glu: int = ACT_NONE, rope: RopeArgs | None = None
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y [M, N] = a @ weight^T (+ bias) for M <= 16 rows of x, a = the prologue of x:
    - norm_weight given: a = norm_weight * rms_norm(x (+ residual)); with a residual, the
      result is (y, x + residual) (written to res_out when given);
    - act: x is [M, 2I] = [gate | up] and a = act(gate) * up (ACT_SILU, ACT_GELU_TANH);
    - else a = x;
    glu (ACT_SILU / ACT_GELU_TANH, with a = x only): weight is [2N, K] = [gate | up] and y
      [M, N] = act(x @ gate^T) * (x @ up^T), rounded as the unfused GEMM + silu_mul;
    rope (with a = x only): weight is the fused QKV one; returns rotary(q) [M, num_heads *
      head_dim], rotary(k) and v written into the caches (kiln.kernels.gemv_swap_rope).
    Rounding as the unfused kernels (module doc); weight [N, K] in x's dtype.
    pdl_launch (default kiln.kernels.pdl.SWAP_GEMV, on sm_90): launched with PDL."""
    M = x.shape[0]
    N, K = weight.shape
    assert 0 < M <= MAX_ROWS, f"the swapped GEMV takes 1-{MAX_ROWS} rows, got {M}"
    assert x.stride(-1) == 1 and weight.stride(-1) == 1
    norm = NORM_NONE if norm_weight is None else (NORM_RMS if residual is None
                                                  else NORM_ADD_RMS)
    assert not (norm and act), "one prologue: a norm or an activation"
    assert x.shape[1] == (2 * K if act else K), "x's width does not match the weight"
    assert not (glu and (norm or act)), "the GLU epilogue takes no prologue"
    assert not glu or N % 2 == 0, "the GLU epilogue takes [gate | up] weights"
    assert rope is None or not (glu or norm or act), "the rotary epilogue takes no prologue"
    cfg = config or swap_config(M, N, K, weight.element_size())
    block_k = min(cfg.block_k, max(16, triton.next_power_of_2(K)))
    split = cfg.split_k if K >= cfg.split_k * block_k else 1
    n_out = N // 2 if glu else N  # out's columns
    tiles = triton.cdiv(n_out, cfg.block_w // 2 if glu else cfg.block_w)
    extra, n_arg = {}, n_out  # the kernel's N: out's columns, or the QKV weight's rows
    if rope is not None:  # out: q, [M, num_heads * head_dim]
        head_dim = rope.cos_sin.shape[1]
        assert cfg.block_w == 64 and N == (rope.num_heads + 2 * rope.num_kv_heads) * head_dim
        tiles, n_out, n_arg = launch_shape(N, head_dim), rope.num_heads * head_dim, N
        extra = dict(rope.kernel_args(head_dim), ROPE_HALF=head_dim // 2)
    out = torch.empty(M, n_out, dtype=x.dtype, device=x.device)
    if norm == NORM_ADD_RMS:
        assert residual.shape == x.shape and residual.stride(-1) == 1
        res_out = torch.empty_like(x) if res_out is None else res_out
    r = residual if residual is not None else x
    ro = res_out if res_out is not None else x
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device) \
        if split > 1 else out
    counters = split_k_counters(x.device, tiles) if split > 1 else out
    late = norm != NORM_NONE and split == 1 and late_norm
    use_pdl = (pdl.SWAP_GEMV if pdl_launch is None else pdl_launch) and pdl.hopper(x)
    _gemv_swap_kernel[(tiles, split)](
        x, r, norm_weight if norm_weight is not None else weight, ro, weight,
        bias if bias is not None else weight, out, part, counters, M, n_arg, K, x.stride(0),
        r.stride(0), ro.stride(0), weight.stride(0), out.stride(0), eps,
        NORM=norm, ACT=act, HAS_BIAS=bias is not None, BLOCK_W=cfg.block_w,
        BLOCK_T=MAX_ROWS, BLOCK_K=block_k,
        NORM_BLOCK=min(4096, triton.next_power_of_2(K)), EVEN_K=K % block_k == 0,
        EVEN_N=n_arg % (cfg.block_w // 2 if glu else cfg.block_w) == 0, SPLIT_K=split,
        LATE_NORM=late,
        PRE_PASS=norm != NORM_NONE and not late, INTERPRET=_INTERPRET, PDL=use_pdl, GLU=glu,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra, **pdl.launch_args(use_pdl),
        **(rotary_kv.NO_FUSION if rope is not None else {}))
    return (out, res_out) if norm == NORM_ADD_RMS else out

