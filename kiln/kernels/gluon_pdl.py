"""Programmatic dependent launch (kiln.kernels.pdl) in the Gluon kernels
(kiln.kernels.int_wgmma, int4_gemv_tma). A module of its own: Gluon exists only in
Triton >= 3.6's API, and kiln.kernels.pdl is imported with any Triton kiln supports."""

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
