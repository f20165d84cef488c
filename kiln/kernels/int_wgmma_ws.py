"""The Gluon W4A16 kernel of kiln.kernels.int_wgmma, warp-specialized: one warp issues
each K step's TMA copies as soon as the ring has a free slot (an `empty` barrier a slot,
arrived at by the compute warps when the step's MMA is done), and the compute warps
(the kernel's num_warps) only wait, dequantize and multiply. The copies' issue, and
the proxy fence before it, leave the compute warps' path; the ring can be deeper for
the same work a step. Untimed; opt-in through WgmmaConfig(ws=True)."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from kiln.kernels.int_wgmma import _dequant, _dequant_fast, _step_groups, _store_out


@gluon.jit
def _ws_load(w_desc, x_desc, s_desc, o_desc, w_ring, x_ring, s_ring, o_ring, ready, empty,
             k_start, k_end, row0, m0, G: gl.constexpr, BLOCK_K: gl.constexpr,
             HAS_OFFSET: gl.constexpr):
    """The copy warp: step i's TMA copies into slot i % STAGES once the compute warps
    have handed it back (the first STAGES steps at once)."""
    STAGES: gl.constexpr = w_ring.type.shape[0]
    NBYTES: gl.constexpr = w_desc.block_type.nbytes + x_desc.block_type.nbytes + \
        s_desc.block_type.nbytes * (2 if HAS_OFFSET else 1)
    i = 0
    for k in range(k_start, k_end, BLOCK_K):
        slot = i % STAGES
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
        bar = ready.index(slot)
        mbarrier.expect(bar, NBYTES)
        tma.async_copy_global_to_shared(w_desc, [row0, k // 8], bar, w_ring.index(slot))
        tma.async_copy_global_to_shared(x_desc, [m0, k], bar, x_ring.index(slot))
        col = k // G // 4 * 4  # (a multiple of 16 bytes: _tma_step)
        tma.async_copy_global_to_shared(s_desc, [row0, col], bar, s_ring.index(slot))
        if HAS_OFFSET:
            tma.async_copy_global_to_shared(o_desc, [row0, col], bar, o_ring.index(slot))
        i += 1


@gluon.jit
def _ws_compute(w_ring, x_ring, s_ring, o_ring, a_smem, ready, empty, k_start, k_end,
                G: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                BLOCK_K: gl.constexpr, HAS_OFFSET: gl.constexpr, FAST: gl.constexpr,
                WARPS: gl.constexpr):
    """The compute warps: each step's tile dequantized to a shared tile, its MMA issued
    and waited for one step later, then the step before's slot handed back."""
    STAGES: gl.constexpr = w_ring.type.shape[0]
    WORDS: gl.constexpr = BLOCK_K // 8
    WT: gl.constexpr = 4
    GW: gl.constexpr = WORDS // WT
    L4: gl.constexpr = gl.BlockedLayout([1, 1, WT, 4], [32 // GW, GW, 1, 1],
                                        [WARPS, 1, 1, 1], [3, 2, 1, 0])
    LW: gl.constexpr = gl.SliceLayout(3, L4)
    LS: gl.constexpr = gl.SliceLayout(2, LW)
    LW2: gl.constexpr = gl.BlockedLayout([1, WT], [32 // GW, GW], [WARPS, 1], [1, 0])
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    A_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K],
                                                                gl.bfloat16)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=ACC)
    i = 0
    for k in range(k_start, k_end, BLOCK_K):
        slot = i % STAGES
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        words = gl.convert_layout(gl.reshape(w_ring.index(slot).load(LW2), [BLOCK_N, GW, WT]),
                                  LW, assert_trivial=True)
        scale = _step_groups(s_ring, slot, k, GW, WT, G, LS)
        if HAS_OFFSET:
            offset = _step_groups(o_ring, slot, k, GW, WT, G, LS)
        else:
            offset = gl.zeros([BLOCK_N, GW], gl.float32, layout=LS)
        if FAST:
            pairs = _dequant_fast(words[:, :, :, None], scale[:, :, None, None],
                                  offset[:, :, None, None])
        else:
            pairs = _dequant(words[:, :, :, None], scale[:, :, None, None],
                             offset[:, :, None, None])
        buf = i % 2
        a_smem.index(buf).store(gl.reshape(pairs, [BLOCK_N, BLOCK_K // 2]))
        fence_async_shared()
        gl.thread_barrier()
        a = a_smem.index(buf)._reinterpret(gl.bfloat16, [BLOCK_N, BLOCK_K], A_SMEM)
        acc = warpgroup_mma(a, x_ring.index(slot).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        # the step before's MMA is done in both warpgroups (arrive: a barrier of the
        # compute warps, then one thread): its slot goes back to the copy warp
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=i > 0)
        i += 1
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    return (acc,)


@gluon.jit
def _w4_wgmma_ws_kernel(x_desc, w_desc, s_desc, o_desc, bias_ptr, out_ptr, part_ptr, count_ptr,
                        M, N, K, K_PER_SPLIT, stride_om, G: gl.constexpr, BLOCK_N: gl.constexpr,
                        BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, HAS_OFFSET: gl.constexpr,
                        HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr,
                        FAST: gl.constexpr):
    """int_wgmma._w4_wgmma_kernel's product, its loop split between a copy warp and the
    compute warps (num_warps + 4 warps in all: register budgets are a warpgroup's)."""
    WORDS: gl.constexpr = BLOCK_K // 8
    WARPS: gl.constexpr = gl.num_warps()
    A_SMEM: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K],
                                                                gl.bfloat16)
    A_PAIRS: gl.constexpr = gl.NVMMASharedLayout(A_SMEM.swizzle_byte_width, 32, 2)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    pid_m = gl.program_id(2)
    a_smem = gl.allocate_shared_memory(gl.int32, [2, BLOCK_N, BLOCK_K // 2], A_PAIRS)
    x_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    w_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, WORDS], w_desc.layout)
    s_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N, 4], s_desc.layout)
    o_ring = gl.allocate_shared_memory(gl.float32, [STAGES if HAS_OFFSET else 1, BLOCK_N, 4],
                                       s_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    fence_async_shared()
    k_start = pid_k * K_PER_SPLIT
    k_end = gl.minimum(k_start + K_PER_SPLIT, K)
    gl.assume(k_end > k_start)  # (as in _w4_wgmma_kernel)
    row0 = pid_n * BLOCK_N
    m0 = pid_m * BLOCK_M
    acc = gl.warp_specialize([
        (_ws_compute, (w_ring, x_ring, s_ring, o_ring, a_smem, ready, empty, k_start, k_end,
                       G, BLOCK_N, BLOCK_M, BLOCK_K, HAS_OFFSET, FAST, WARPS)),
        (_ws_load, (w_desc, x_desc, s_desc, o_desc, w_ring, x_ring, s_ring, o_ring, ready,
                    empty, k_start, k_end, row0, m0, G, BLOCK_K, HAS_OFFSET)),
    ], [1], [24])[0]
    _store_out(acc, bias_ptr, out_ptr, part_ptr, count_ptr, M, N, stride_om, pid_n, pid_k,
               pid_m, BLOCK_N, BLOCK_M, HAS_BIAS, SPLIT_K, WARPS)
