"""W8A16 decode batches on Hopper's warpgroup MMA, in Gluon: kiln.kernels.int_wgmma's
loop (see its doc: computed transposed, TMA ring on barriers, the tile dequantized into
one of two shared tiles, each step's wgmma waited for a step later, K splits meeting in
the kernel) for INT8 weights with a scale a channel (int8_wo).

An int8 value is exact in bfloat16, so the tensor cores multiply x by q itself and the
channel's scale multiplies the float32 sum once an output, after the loop: a weight
costs a quarter of a xor, a byte permute and a float subtraction (2^23 + 128 + q taken
down to q), and half a cvt. The Triton tiles multiply by bf16(q s) instead, so the two
differ by bfloat16's rounding of the weight (the reference: q s in float32).

Opt-in (KILN_INT8_WGMMA=A-B: rows A to B; kiln.kernels.int_launch.wgmma_rows) until
timed on a GPU: compiled for sm_90 and its PTX evaluated on the CPU only (53rd session).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from kiln.kernels.int_wgmma import (
    WgmmaConfig,
    _a_tiles_x_ring,
    _mma_step,
    _ring_barriers,
    _store_out,
    wgmma_config,
)
from kiln.kernels.split_k import split_k_counters

# Four int8 values of a 32-bit word (value i in byte i) -> two bfloat16 pairs (int32):
# each byte biased to unsigned (xor 0x80), moved into the low byte of 2^23 (prmt), and
# 2^23 + 128 taken off (exact); $2 is the word ($3 repeats it).
_BYTES = gl.constexpr("{\n.reg .b32 u, a, b;\nxor.b32 u, $2, 0x80808080;\n" + "".join(
    f"prmt.b32 a, u, 0x4B000000, 0x744{2 * j};\n"
    f"prmt.b32 b, u, 0x4B000000, 0x744{2 * j + 1};\n"
    "sub.f32 a, a, 0f4B000080;\n"
    "sub.f32 b, b, 0f4B000080;\n"
    f"cvt.rn.bf16x2.f32 ${j}, b, a;\n" for j in range(2)) + "}")


@gluon.jit
def _load_step(w_desc, x_desc, w_ring, x_ring, bars, step, STAGES: gl.constexpr, k_start,
               k_end, row0, m0, BLOCK_K: gl.constexpr):
    """The split's K step `step` into ring slot step % STAGES by TMA (nothing past the
    split's end): its words and x's tile, counted on the slot's barrier."""
    k = k_start + step * BLOCK_K
    slot = step % STAGES
    live = k < k_end
    bar = bars.index(slot)
    mbarrier.expect(bar, w_desc.block_type.nbytes + x_desc.block_type.nbytes, pred=live)
    tma.async_copy_global_to_shared(w_desc, [row0, k // 4], bar, w_ring.index(slot), pred=live)
    tma.async_copy_global_to_shared(x_desc, [m0, k], bar, x_ring.index(slot), pred=live)


@gluon.jit
def _w8_wgmma_kernel(x_desc, w_desc, scale_ptr, bias_ptr, out_ptr, part_ptr, count_ptr, M, N,
                     K, K_PER_SPLIT, stride_om, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                     BLOCK_K: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr,
                     STAGES: gl.constexpr):
    """out[M, N] = (x [M, K] @ q^T) * scale (+ bias) for the column block program_id(0),
    the K split program_id(1) and the row block program_id(2): x bfloat16 and q int8 as
    int32 words [N, K / 4], each a TMA descriptor; scale [N]; 4 warps for each 64 rows of
    BLOCK_N."""
    WORDS: gl.constexpr = BLOCK_K // 4
    WT: gl.constexpr = 4
    GW: gl.constexpr = WORDS // WT
    WARPS: gl.constexpr = gl.num_warps()
    L4: gl.constexpr = gl.BlockedLayout([1, 1, WT, 2], [32 // GW, GW, 1, 1],
                                        [WARPS, 1, 1, 1], [3, 2, 1, 0])
    LW: gl.constexpr = gl.SliceLayout(3, L4)
    LW2: gl.constexpr = gl.BlockedLayout([1, WT], [32 // GW, GW], [WARPS, 1], [1, 0])
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    pid_m = gl.program_id(2)
    a_smem, x_ring = _a_tiles_x_ring(x_desc, BLOCK_N, BLOCK_M, BLOCK_K, STAGES)
    w_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, WORDS], w_desc.layout)
    bars = _ring_barriers(STAGES)

    k_start = pid_k * K_PER_SPLIT
    k_end = gl.minimum(k_start + K_PER_SPLIT, K)
    gl.assume(k_end > k_start)  # (as in int_wgmma: no path around the loop)
    row0 = pid_n * BLOCK_N
    m0 = pid_m * BLOCK_M
    for s in gl.static_range(STAGES - 1):
        _load_step(w_desc, x_desc, w_ring, x_ring, bars, s, STAGES, k_start, k_end, row0, m0,
                   BLOCK_K)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=ACC)
    i = 0
    for _k in range(k_start, k_end, BLOCK_K):
        slot = i % STAGES
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        words = gl.convert_layout(gl.reshape(w_ring.index(slot).load(LW2), [BLOCK_N, GW, WT]),
                                  LW, assert_trivial=True)
        shape: gl.constexpr = [BLOCK_N, GW, WT, 2]
        pairs = gl.inline_asm_elementwise(_BYTES, "=r,=r,r,r",
                                          [words[:, :, :, None].broadcast_to(shape)],
                                          dtype=gl.int32, is_pure=True, pack=2)
        acc = _mma_step(pairs, a_smem, x_ring, slot, i, acc, BLOCK_N, BLOCK_K)
        # the step before's MMA is done and every thread read its words (this step's
        # barrier): its slot takes the step STAGES - 1 ahead
        _load_step(w_desc, x_desc, w_ring, x_ring, bars, i + STAGES - 1, STAGES, k_start,
                   k_end, row0, m0, BLOCK_K)
        i += 1
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))
    offs_n = row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ACC))
    scale = gl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)
    _store_out(acc * scale[:, None], bias_ptr, out_ptr, part_ptr, count_ptr, M, N, stride_om,
               pid_n, pid_k, pid_m, BLOCK_N, BLOCK_M, HAS_BIAS, SPLIT_K, WARPS)


def w8_config(M: int, N: int, K: int) -> WgmmaConfig:
    """int_wgmma's launch rule, with 2 ring stages at 128 weight rows a program: a step's
    16 KB of int8 words would make 3 stages ~120 KB of shared memory, one program an SM."""
    cfg = wgmma_config(M, N, K)
    return dataclasses.replace(cfg, stages=2) if cfg.block_n == 128 else cfg


def wgmma_eligible(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                   offset: torch.Tensor | None = None, block_k: int = 128) -> bool:
    """Whether w8_wgmma takes this product: Hopper, bfloat16 x with rows 16-byte aligned,
    int8 weight [N, K] with rows 16-byte aligned, a scale a channel and no offset, K in
    whole steps."""
    K = x.shape[1]
    return x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9 and \
        x.dtype == torch.bfloat16 and weight.dtype == torch.int8 and offset is None and \
        scale.shape[1] == 1 and K % block_k == 0 and x.stride(1) == 1 and \
        x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0 and weight.stride(1) == 1 and \
        weight.stride(0) % 16 == 0 and weight.data_ptr() % 16 == 0


def w8_wgmma(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
             offset: torch.Tensor | None, bias: torch.Tensor | None,
             config: WgmmaConfig | None = None) -> torch.Tensor:
    """x [M, K] bfloat16 @ (int8 weight [N, K] * scale [N, 1])^T (+ bias) -> [M, N]
    bfloat16 (offset: None, as wgmma_eligible requires)."""
    M, K = x.shape
    N = weight.shape[0]
    cfg = config or w8_config(M, N, K)
    block_m = 8 if M <= 8 else 16 if M <= 16 else 32 if M <= 32 else 64
    steps = K // cfg.block_k
    k_per_split = triton.cdiv(steps, max(1, min(cfg.split_k, steps))) * cfg.block_k
    split = triton.cdiv(K, k_per_split)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, cfg.block_n), split, triton.cdiv(M, block_m))
    part, counters = (torch.empty(split, M * N, dtype=torch.float32, device=x.device),
                      split_k_counters(x.device, grid[0] * grid[2])) if split > 1 else \
        (out, out)
    words = weight.view(torch.int32)
    x_desc = TensorDescriptor(x, [M, K], [x.stride(0), 1], [block_m, cfg.block_k],
                              gl.NVMMASharedLayout.get_default_for([block_m, cfg.block_k],
                                                                   gl.bfloat16))
    w_shape = [cfg.block_n, cfg.block_k // 4]
    w_desc = TensorDescriptor(words, [N, K // 4], [words.stride(0), 1], w_shape,
                              gl.NVMMASharedLayout.get_default_for(w_shape, gl.int32))
    s = scale.reshape(-1)
    _w8_wgmma_kernel[grid](x_desc, w_desc, s, bias if bias is not None else s, out, part,
                           counters, M, N, K, k_per_split, out.stride(0),
                           BLOCK_N=cfg.block_n, BLOCK_M=block_m, BLOCK_K=cfg.block_k,
                           HAS_BIAS=bias is not None, SPLIT_K=split, STAGES=cfg.stages,
                           num_warps=cfg.block_n // 16)
    return out


wgmma_linear = w8_wgmma  # (kiln.kernels.int_gemm's dispatch: int_launch.wgmma_module(8))
