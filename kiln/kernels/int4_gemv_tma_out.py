"""The epilogues of the TMA-fed one-row int4 GEMV (kiln.kernels.int4_gemv_tma), each
saving the launch after it: act(gate) * up of a merged gate-up (_glu_out) and the rotary +
KV-cache write of a fused QKV (_rope_out). (A residual add + RMSNorm epilogue after the o
and down projections was measured no faster and removed in the 58th session:
BENCHMARKS.md.)"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def _halves(y, BLOCK_N: gl.constexpr, WARPS: gl.constexpr):
    """A program's sums y [BLOCK_N] as its two halves [BLOCK_N / 2] in one 1-D layout
    (through shared memory), and arange(BLOCK_N / 2) in it."""
    HALF: gl.constexpr = BLOCK_N // 2
    L1: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    buf = gl.allocate_shared_memory(gl.float32, [BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    buf.store(y)
    gl.thread_barrier()
    return buf.slice(0, HALF).load(L1), buf.slice(HALF, HALF).load(L1), \
        gl.arange(0, HALF, layout=L1)


@gluon.jit
def _glu_out(y, bias_ptr, out_ptr, pid_n, cols, BLOCK_N: gl.constexpr,
             HAS_BIAS: gl.constexpr, GLU: gl.constexpr, WARPS: gl.constexpr):
    """act(gate) * up of a program's sums y (BLOCK_N / 2 gate rows, then the up rows of
    the same columns) into out[cols of the program], rounded as kiln's SiLU*mul kernel
    rounds the stored GEMM (kiln.kernels.silu_mul.act_mul_values; GLU 1: SiLU, 2: tanh
    GELU)."""
    HALF: gl.constexpr = BLOCK_N // 2
    gate, up, i = _halves(y, BLOCK_N, WARPS)
    c = pid_n * HALF + i
    mask = c < cols
    if HAS_BIAS:
        gate += gl.load(bias_ptr + c, mask=mask, other=0.0).to(gl.float32)
        up += gl.load(bias_ptr + cols + c, mask=mask, other=0.0).to(gl.float32)
    dt: gl.constexpr = out_ptr.dtype.element_ty
    g = gate.to(dt).to(gl.float32)
    if GLU == 2:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = 0.5 * g * (2.0 - 2.0 / (gl.exp(2.0 * z) + 1.0))
    else:
        act = g / (1.0 + gl.exp(-g))
    out = act.to(dt).to(gl.float32) * up.to(dt).to(gl.float32)
    gl.store(out_ptr + c, out.to(dt), mask=mask)


@gluon.jit
def _rope_out(y, bias_ptr, q_ptr, pid_n, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr, num_heads,
              num_kv_heads, block_size, stride_cs, stride_cb, stride_cslot, stride_ch,
              stride_vs, stride_vh, stride_vd, BLOCK_N: gl.constexpr,
              ROPE_HALF: gl.constexpr, HAS_BIAS: gl.constexpr, WARPS: gl.constexpr):
    """A program's sums y of one head's dims (BLOCK_N / 2 of its first half, then the dims
    they rotate with) through the rotary + KV write of kiln.kernels.rotary_kv, rounded as
    kiln.kernels.gemv_swap_rope.rope_epilogue rounds the stored GEMM: a q head rotated into
    q_ptr, a k head rotated and a v head as it is into the paged caches at the token's
    slot (< 0: not written)."""
    HALF: gl.constexpr = BLOCK_N // 2
    x1, x2, i = _halves(y, BLOCK_N, WARPS)
    head = pid_n // (ROPE_HALF // HALF)
    d = pid_n % (ROPE_HALF // HALF) * HALF + i
    if HAS_BIAS:
        x1 += gl.load(bias_ptr + head * (2 * ROPE_HALF) + d).to(gl.float32)
        x2 += gl.load(bias_ptr + head * (2 * ROPE_HALF) + ROPE_HALF + d).to(gl.float32)
    dt: gl.constexpr = q_ptr.dtype.element_ty
    b1 = x1.to(dt)
    b2 = x2.to(dt)
    a1 = b1.to(gl.float32)
    a2 = b2.to(gl.float32)
    row = cs_ptr + gl.load(pos_ptr).to(gl.int64) * stride_cs + d
    cos = gl.load(row).to(dt).to(gl.float32)
    sin = gl.load(row + ROPE_HALF).to(dt).to(gl.float32)
    y1 = ((a1 * cos).to(dt).to(gl.float32) + (-a2 * sin).to(dt).to(gl.float32)).to(dt)
    y2 = ((a2 * cos).to(dt).to(gl.float32) + (a1 * sin).to(dt).to(gl.float32)).to(dt)
    if head < num_heads:
        q_at = q_ptr + head * (2 * ROPE_HALF) + d
        gl.store(q_at, y1)
        gl.store(q_at + ROPE_HALF, y2)
    else:
        slot = gl.load(slot_ptr).to(gl.int64)
        if slot >= 0:
            block = slot // block_size * stride_cb
            within = slot % block_size
            if head < num_heads + num_kv_heads:
                k_at = kc_ptr + block + within * stride_cslot + (head - num_heads) * stride_ch + d
                gl.store(k_at, y1)
                gl.store(k_at + ROPE_HALF, y2)
            else:  # v: as stored (its own strides: V may be transposed in each block)
                v_at = vc_ptr + block + within * stride_vs + \
                    (head - num_heads - num_kv_heads) * stride_vh + d * stride_vd
                gl.store(v_at, b1)
                gl.store(v_at + ROPE_HALF * stride_vd, b2)

