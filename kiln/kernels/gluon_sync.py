"""How the Gluon kernels (kiln.kernels.int_wgmma, int4_gemv_tma) wait on other programs:
programmatic dependent launch (kiln.kernels.pdl) and kiln.kernels.split_k's arrival
count. A module of its own: Gluon exists only in Triton >= 3.6's API, and
kiln.kernels.pdl and split_k are imported with any Triton kiln supports."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def gluon_wait():
    """In a Gluon kernel launched with PDL: wait for the kernel before (its writes
    visible)."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def gluon_trigger():
    """In a Gluon kernel launched with PDL: let the kernel after it start."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                              dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def gluon_start():
    """kiln.kernels.pdl.pdl_start in a Gluon kernel launched with PDL: wait for the kernel
    before (its writes visible), then let the one after start."""
    gluon_wait()
    gluon_trigger()


@gluon.jit
def arrive(count_ptr, slot, lanes):
    """kiln.kernels.split_k.arrive: every thread's stores so far visible device-wide (a
    fence on each thread of lanes' layout), then the count at slot (acquire-release);
    returns how many programs had arrived before this one."""
    gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r,r", [lanes],
                              dtype=gl.int32, is_pure=False, pack=1)
    gl.thread_barrier()
    return gl.atomic_add(count_ptr + slot, 1, sem="acq_rel", scope="gpu")
