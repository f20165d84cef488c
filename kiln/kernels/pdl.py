"""Programmatic dependent launch (PDL, Hopper and newer) for the kernels of a decode step.

A kernel launched with `launch_pdl=True` may be scheduled while the kernel before it on
the stream is still finishing; it calls `pdl_start(PDL)` first thing, which waits
(griddepcontrol.wait) until that kernel has completed and its writes are visible, then
lets the kernel after it be scheduled early in turn. Correctness is as without PDL (no
memory is touched before the wait); what is saved is the launch latency and the
ramp-up between the ~10 dependent kernels per layer of a batch-1 decode step, where
each kernel runs for only a few microseconds.

On by default on sm_90 since the 30th session (KILN_PDL=0 turns it off; off under
TRITON_INTERPRET, on CPUs and on cards before sm_90): the small kernels (norms, SiLU*mul,
rotary + KV write, FP8 quantization) and the swapped bf16 decode GEMV (KILN_SWAP_PDL=0
turns that one off), behind which the norm, SiLU*mul and decode attention let it start at
once. H200, Llama-3.1-8B, batch 1 (128 in / 256 out), alternating in one call: bf16 238.1
/ 238.1 tok/s against 228.4 / 228.5 with neither; the small kernels alone 225.0 / 225.1
(the 22nd session measured them alone within the noise, 215.78 vs 215.23); FP8 + FP8 KV
327.4 / 327.5 against 323.7 / 323.8. The custom all-reduce's PDL launch (two GPUs, not
lent since it was written) stays opt-in: KILN_PDL=1 explicitly. Since the 31st session
the decode attention (KILN_ATTN_PDL=0: not) and the one-row INT4 GEMV (KILN_INT_PDL=0: not;
the small kernels then take part in INT4 engines too) are PDL-launched as well: bf16 batch
1 with the GEMV epilogues 239.2 / 239.3 against 234.9 / 235.0, INT4 387.6 / 387.9 against
370.4 / 372.0, FP8 342.3 against 337.0. The FP8 GEMM's own PDL
launch behind its quantization kernel (kiln.kernels.fp8) is separate and on.
An L2 prefetch of the GEMV's first weight bytes before it waits (cp.async.bulk.prefetch)
made both slower (bf16 8 MB 226.9, 24 MB 213.7; FP8 8 MB 313.9 vs 323.6) and was removed.
Since the 49th session the one-row INT4 GEMV loads its first K step (words, scales,
offsets: a program's own, into registers) before it waits (KILN_INT_PRELOAD=0: not). On an
H100, alternating in one call: INT4 g128 batch 1 385.7 / 385.5 tok/s against 376.4 / 376.5
(+2.4%; 386.1 / 387.1 against 376.9 / 378.9 in another call), the GGUF Q4 layout (int4 g32)
280.6 against 269.7; the first two steps before the wait 349.1 / 350.6 (slower, not
kept). The same for the swapped bf16 GEMV's first weight tile: 181.5 / 181.6 against
182.3 / 182.3, not kept. Since the 50th session the one-row INT8 GEMV is PDL-launched the
same way (KILN_INT8_PDL=0: not; H100, batch 1 alternating twice: int8_wo 276.5 / 276.4
against 263.6 / 263.5, int8 g32 (GGUF Q8_0) 229.7 / 229.3 against 222.7 / 223.2, INT4 with
an 8-bit head 387.2 / 385.7 against 385.7 / 385.6), and GGUF engines' small kernels with
it (KILN_GGUF_PDL=0: not; random Q4_1 files, batch 1: SmolLM2's shape 1351.3 / 1325.6
against 1002.8 / 921.2, Llama-3.1-8B's 280.2 / 279.9 against 279.4 / 279.8).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# KILN_PDL=0: nothing PDL-launched. The swapped 16-bit decode GEMV (kiln.kernels.gemv_swap)
# launched with PDL behind the kernels before it (norms, SiLU*mul, decode attention), which
# let it start at once (KILN_SWAP_PDL=0: not).
_ON = os.environ.get("KILN_PDL", "1") != "0"
ALLREDUCE = os.environ.get("KILN_PDL") == "1"  # the custom all-reduce's: asked for only
SWAP_GEMV = _ON and os.environ.get("KILN_SWAP_PDL", "1") != "0"
# the one-row INT4 GEMV (kiln.kernels.int_gemv_pairs) the same way, and the small kernels'
# PDL with it in INT4 engines (KILN_INT_PDL=0: not; INT4 batch 1 387.7 tok/s against 371.2
# without, H200, 31st session)
INT_GEMV = _ON and os.environ.get("KILN_INT_PDL", "1") != "0"
# the one-row INT4 GEMV's first K step of weights loaded before its wait (KILN_INT_PRELOAD=0:
# not), the weight streaming while the kernel before finishes (module doc)
INT_PRELOAD = os.environ.get("KILN_INT_PRELOAD", "1") != "0"
# the one-row INT8 GEMV (kiln.kernels.int_gemv1: int8_wo, GGUF's Q8_0 and Q5-Q6 blocks,
# 8-bit LM heads) the same way, its first K step loaded before the wait (KILN_INT8_PDL=0:
# not); int8_wo engines' small kernels then take part
INT8_GEMV = _ON and os.environ.get("KILN_INT8_PDL", "1") != "0"
# GGUF engines whose every layer runs on a PDL-launched GEMV take part as int4_wo ones do
# (linears_take_part; KILN_GGUF_PDL=0: not)
GGUF = os.environ.get("KILN_GGUF_PDL", "1") != "0"
# the decode attention PDL-launched behind the rotary + KV write (KILN_ATTN_PDL=0: not)
ATTENTION = _ON and os.environ.get("KILN_ATTN_PDL", "1") != "0"


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def hopper(t: torch.Tensor) -> bool:
    """Whether kernels on t's device may use PDL instructions at all (griddepcontrol needs
    sm_90; compiled, not interpreted)."""
    return (t.is_cuda and not _INTERPRET
            and _capable(t.device.index if t.device.index is not None else
                         torch.cuda.current_device()))


_SMALL = [True]  # set per engine by set_small_kernels (the last engine loaded decides)


def set_small_kernels(linears_wait: bool) -> None:
    """Whether the small kernels are PDL-launched: only where the engine's decode linears
    are launched with PDL themselves and let them start (16-bit on the swapped GEMV, FP8):
    behind the integer GEMVs, which do not, it cost INT4 batch 1 2.7% (H200, 30th session:
    362.2 / 362.3 tok/s against 372.1 with KILN_PDL=0), as it cost bf16 when its GEMV did
    not (225.0 against 228.4)."""
    _SMALL[0] = linears_wait


def linears_take_part(method: str, storages: dict[str, str], sm90: bool) -> bool:
    """Whether an engine's decode linears are PDL-launched (set_small_kernels): 16-bit ones
    on the swapped GEMV (sm_90 only), FP8 (the swapped FP8 GEMM), INT4 (unless KILN_INT_PDL=0);
    every per-layer method among them. A GGUF engine ("gguf") takes part (unless
    KILN_GGUF_PDL=0) where every linear's storage does: 16-bit ("none"), 4-bit
    ("int4_g32[_offset]": Q4_0, Q4_1 and Q4_K blocks, on the same one-row INT4 GEMV as
    int4_wo) and 8-bit ("int8_g*": Q8_0, Q5-Q6 blocks, on the one-row INT8 GEMV, as
    int8_wo; with KILN_INT8_PDL=0 one of them keeps the small kernels' plain launches).
    storages: engine.json's quant_layers (linear name -> storage); the LM head's, run once
    a step, is left out, as int4_wo engines' 8-bit heads are."""
    takes_part = ("none",) * sm90 + ("fp8",) + (
        ("int4_wo", "int4_awq", "int4_gptq") if INT_GEMV else ()) + ("int8_wo",) * INT8_GEMV

    def part(q: str) -> bool:
        return q in takes_part or (INT_GEMV and q.startswith("int4_g")) or (
            INT8_GEMV and q.startswith("int8_g"))

    layers = [q for name, q in storages.items() if name != "lm_head"]
    if method == "gguf":
        return GGUF and bool(layers) and all(part(q) for q in layers)
    return method in takes_part and all(part(q) for q in layers)


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on t's device are launched with PDL."""
    return _ON and _SMALL[0] and hopper(t)


def dependents(t: torch.Tensor) -> bool:
    """Whether a kernel before a decode GEMV lets it start at once (KILN_SWAP_PDL, or
    KILN_INT_PDL for the INT4 one)."""
    return (SWAP_GEMV or INT_GEMV) and hopper(t)


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


@triton.jit
def pdl_enter(PDL: tl.constexpr, DEPENDENTS: tl.constexpr):
    """pdl_start(PDL); DEPENDENTS (not PDL-launched itself): let the kernel after start at
    once (it waits for this one with griddepcontrol.wait before touching memory)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    else:
        if DEPENDENTS:
            gdc_launch_dependents()

