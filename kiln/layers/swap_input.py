"""Which 16-bit decode linears run on the swapped GEMV (kiln.kernels.gemv_swap), and a
linear layer's input handed over uncomputed, for that kernel to compute in its prologue
(RMSNorm with the residual add, or act(gate) * up). By default (KILN_BF16_SWAP=1) the plain
GEMV takes unquantized layers at 1-16 rows on sm_90 (LinearMethod.apply); the prologues
are opt-in (KILN_BF16_SWAP=fused), being slower so far; 0 keeps cuBLAS.

The way FP8 layers have their input quantized by the norm before them (input_quant() ->
FP8Quant -> FP8Act), an unquantized layer's input_quant() returns SWAP_PROLOGUE; the norm
or activation wrapper then returns a PendingInput instead of launching its kernel where
the swapped GEMV takes the rows (a decode step of 1-16 rows in bf16 / fp16 on Hopper), and
LinearMethod.apply hands it to gemv_swap. The residual sum the norm returns beside it is
an empty tensor the GEMV's program (0, 0) fills; the decoder layer reads it only after
the linear ran. Anything else that gets a PendingInput calls materialize().
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch

# 16-bit decode linears (1-16 rows, sm_90) on the swapped GEMV, plain (the default, "1":
# bf16 batch 1 225.3 / 225.4 vs 216.2 / 216.3 tok/s on cuBLAS, H200, 29th session);
# "fused": with the norm / activation before them in its prologue (slower: 182.6); "0": cuBLAS
_MODE = os.environ.get("KILN_BF16_SWAP", "1")
if _MODE not in ("0", "1", "fused"):
    import warnings

    warnings.warn(f"KILN_BF16_SWAP={_MODE!r} is not 0, 1 or fused: 1 (the default) is used",
                  stacklevel=1)
    _MODE = "1"
FUSED = _MODE == "fused"
PLAIN = _MODE == "1"
# the gated MLP's act(gate) * up in the gate-up GEMV's epilogue (glu_linear; KILN_SWAP_GLU=0:
# not) and the QKV GEMV with the rotary + KV-cache write in its epilogue (Attention.fused_qkv;
# KILN_SWAP_ROPE=0: not). bf16 batch 1 on an H200 (31st session): both with the decode
# attention's PDL 239.2 / 239.3 tok/s against 234.9 / 235.0 without the three
GLU = os.environ.get("KILN_SWAP_GLU", "1") != "0"
ROPE = os.environ.get("KILN_SWAP_ROPE", "1") != "0"
# the same epilogues in the one-row int4 GEMV (kiln.kernels.int_gemv_epilogues through
# IntWeightMethod.apply_glu / apply_rope; KILN_INT_GLU=0 / KILN_INT_ROPE=0: not). INT4 batch
# 1 on an H200 (32nd session), with KILN_INT_ROW_TILES's launches: 402.9 / 402.7 tok/s
# against 399.7 with the row tiles alone
INT_GLU = os.environ.get("KILN_INT_GLU", "1") != "0"
INT_ROPE = os.environ.get("KILN_INT_ROPE", "1") != "0"
MAX_N = 65536  # weights with more rows (vocabulary heads) stay on cuBLAS
DTYPES = (torch.bfloat16, torch.float16)  # the weights and inputs it takes
_CAPABLE: dict[int, bool] = {}
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once: takes() is per linear


class SwapPrologue:
    """The marker LinearMethod.input_quant() returns when its layer computes its input."""

    def __repr__(self) -> str:
        return "SWAP_PROLOGUE"


SWAP_PROLOGUE = SwapPrologue()


def takes(x: torch.Tensor) -> bool:
    """Whether the swapped GEMV takes x's rows: 2-D with unit column stride, 1-16 rows,
    16-bit, on sm_90 (what was measured), not under the Triton interpreter."""
    if not (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= 16 and x.stride(-1) == 1
            and x.dtype in DTYPES
            and not _INTERPRET):
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index) == (9, 0)
    return _CAPABLE[index]


@dataclasses.dataclass
class PendingInput:
    """norm_weight * rms_norm(x (+ residual)) (act == 0) or act(gate) * up of x = [gate | up]
    (act 1: SiLU, 2: tanh GELU), not yet computed; res_out: where x + residual goes."""

    x: torch.Tensor
    residual: torch.Tensor | None = None
    norm_weight: torch.Tensor | None = None
    eps: float = 0.0
    act: int = 0
    res_out: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.x.shape[0], self.x.shape[1] // (2 if self.act else 1)))

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """weight's linear of the input, the prologue computed by the GEMV."""
        from kiln.kernels import gemv_swap

        if self.act:
            return gemv_swap.gemv_swap(self.x, weight, bias, act=self.act)
        out = gemv_swap.gemv_swap(self.x, weight, bias, residual=self.residual,
                                  norm_weight=self.norm_weight, eps=self.eps,
                                  res_out=self.res_out)
        return out[0] if self.residual is not None else out

    def materialize(self) -> torch.Tensor:
        """The input itself, by the unfused kernels (and res_out filled)."""
        from kiln.kernels import rms_norm, silu_mul

        if self.act:
            return silu_mul.silu_and_mul(self.x, gelu_tanh=self.act == 2)
        if self.residual is None:
            return rms_norm.rms_norm(self.x, self.norm_weight, self.eps)
        out, summed = rms_norm.add_rms_norm(self.x, self.residual, self.norm_weight, self.eps)
        self.res_out.copy_(summed)
        return out


def pending_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> PendingInput | tuple[PendingInput, torch.Tensor] | None:
    """The norm's result left to the linear after it (None: x is not for the swapped GEMV):
    the PendingInput, and with a residual the (still empty) x + residual beside it."""
    if not takes(x) or weight.dtype != x.dtype or x.stride(-1) != 1 or (
            residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1)):
        return None
    if residual is None:
        return PendingInput(x, None, weight, eps)
    res_out = torch.empty_like(x)
    return PendingInput(x, residual, weight, eps, 0, res_out), res_out


def pending_act(x: torch.Tensor, gelu_tanh: bool) -> PendingInput | None:
    """act(gate) * up left to the linear after it (None: not for the swapped GEMV)."""
    if not takes(x) or x.stride(-1) != 1:
        return None
    return PendingInput(x, act=2 if gelu_tanh else 1)


def weight_takes(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the swapped GEMV takes x's rows against this 16-bit weight (not a vocabulary
    head's: more than MAX_N rows stay on cuBLAS)."""
    return weight.dtype == x.dtype and weight.shape[0] <= MAX_N and takes(x)


def _plain_16bit(layer: object, x: object) -> bool:
    """An unquantized, unsharded-output layer whose weight and rows the swapped GEMV takes."""
    return isinstance(x, torch.Tensor) and getattr(layer.method, "name", None) == "none" \
        and not getattr(layer, "gather_output", False) and weight_takes(layer.weight, x)


def rope_route(layer: object, x: object) -> Callable[[object], torch.Tensor | None] | None:
    """How the fused QKV layer's GEMV at x may do the rotary + KV write: a function of the
    kiln.kernels.gemv_swap_rope.RopeArgs that returns rotary(q) (or None where the launch
    does not take it), or None. The swapped 16-bit GEMV (KILN_SWAP_ROPE), a one-row int4
    GEMV (KILN_INT_ROPE=0: not; the method's apply_rope); the attention layer checks the rotary
    and the cache."""
    if ROPE and PLAIN and _plain_16bit(layer, x):
        from kiln.kernels import gemv_swap

        return lambda rope: gemv_swap.gemv_swap(x, layer.weight, layer.bias, rope=rope)
    apply_rope = getattr(layer.method, "apply_rope", None)
    if INT_ROPE and apply_rope is not None and isinstance(x, torch.Tensor) and \
            not getattr(layer, "gather_output", False):
        return lambda rope: apply_rope(layer, x, rope)
    return None


def glu_linear(layer: object, x: object, act: int, down: object) -> torch.Tensor | None:
    """act(gate) * up of a merged [gate | up] layer at x by the swapped GEMV's GLU epilogue
    (act 1: SiLU, 2: tanh GELU), or None where it does not take x (KILN_SWAP_GLU off, x not
    a decode step's rows on sm_90, a quantized gate-up, or a down projection that wants its
    input quantized by the activation kernel); a one-row int4 gate-up (KILN_INT_GLU=0:
    not): its method's apply_glu."""
    if not isinstance(x, torch.Tensor) or down.input_quant() is not None:
        return None
    if GLU and PLAIN and _plain_16bit(layer, x):
        from kiln.kernels import gemv_swap

        return gemv_swap.gemv_swap(x, layer.weight, layer.bias, glu=act)
    apply_glu = getattr(layer.method, "apply_glu", None)
    if INT_GLU and apply_glu is not None and not getattr(layer, "gather_output", False):
        return apply_glu(layer, x, act)
    return None
