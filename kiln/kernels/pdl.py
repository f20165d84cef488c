"""Programmatic dependent launch (PDL, Hopper and newer) for the small kernels of a
decode step.

A kernel launched with `launch_pdl=True` may be scheduled while the kernel before it on
the stream is still finishing; it calls `pdl_start(PDL)` first thing, which waits
(griddepcontrol.wait) until that kernel has completed and its writes are visible, then
lets the kernel after it be scheduled early in turn. Correctness is as without PDL (no
memory is touched before the wait); what is saved is the launch latency and the
ramp-up between the ~10 dependent kernels per layer of a batch-1 decode step, where
each kernel runs for only a few microseconds. Opt-in with KILN_PDL=1 (off under
TRITON_INTERPRET, on CPUs and on cards before sm_90): on an H200 it did not change the
batch-1 decode speed measurably (FP8: 249.1 vs 248.9 tok/s) and its GPU tests have not
run yet, so it stays off by default. The FP8 GEMM's own PDL launch behind its
quantization kernel (kiln.kernels.fp8) is separate and on.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def hopper(t: torch.Tensor) -> bool:
    """Whether kernels on t's device may use PDL instructions at all (griddepcontrol needs
    sm_90; compiled, not interpreted)."""
    return (t.is_cuda and not _INTERPRET
            and _capable(t.device.index if t.device.index is not None else
                         torch.cuda.current_device()))


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on t's device are launched with PDL."""
    return os.environ.get("KILN_PDL", "0") == "1" and hopper(t)


def launch_args(on: bool) -> dict:
    """The extra launch keyword for a kernel started with PDL."""
    return {"launch_pdl": True} if on else {}


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """First statement of a PDL-launched kernel: wait for the previous kernel, then let
    the next one start."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
