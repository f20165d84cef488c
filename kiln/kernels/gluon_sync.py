"""How the Gluon kernels (kiln.kernels.int_wgmma, int4_gemv_tma) wait on
other programs: programmatic dependent launch (kiln.kernels.pdl) and kiln.kernels.split_k's
arrival count (arrive, and split_k_sum on it). A module of its own: Gluon exists only in
Triton >= 3.6's API, and kiln.kernels.pdl and split_k are imported with any Triton kiln
supports."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def gluon_start():
    """kiln.kernels.pdl.pdl_start in a Gluon kernel launched with PDL: wait for the kernel
    before (its writes visible), then let the one after start."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                              dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def arrive(count_ptr, slot, lanes):
    """kiln.kernels.split_k.arrive: every thread's stores so far visible device-wide (a
    fence on each thread of lanes' layout), then the count at slot (acquire-release);
    returns how many programs had arrived before this one."""
    gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r,r", [lanes],
                              dtype=gl.int32, is_pure=False, pack=1)
    gl.thread_barrier()
    return gl.atomic_add(count_ptr + slot, 1, sem="acq_rel", scope="gpu")


@gluon.jit
def split_k_sum(y, part_ptr, offs, mask, elems, pid_k, count_ptr, slot, lanes,
                SPLIT_K: gl.constexpr):
    """kiln.kernels.split_k's protocol in a Gluon kernel: y (this K split's float32 sums at
    offs of an [elems] output) stored in the split's slice of part, then counted in at
    slot; the program that arrives last adds every slice in split order (the sum does not
    depend on arrival) and zeroes the counter. Returns (y, last): the full sums in the
    last program."""
    gl.store(part_ptr + pid_k * elems + offs, y, mask=mask)
    last = arrive(count_ptr, slot, lanes) == SPLIT_K - 1
    if last:
        y = gl.zeros_like(y)
        for sp in range(SPLIT_K):
            y += gl.load(part_ptr + sp * elems + offs, mask=mask, other=0.0,
                         cache_modifier=".cg")
        gl.store(count_ptr + slot, 0)
    return y, last
