"""FP8 linear layers for decode batches of 65-192 rows (256 for the down projection's
shape): on by default, KILN_FP8_MID_TENSORWISE=0 turns it off.

H200, twenty-sixth session (benchmarks/fp8_gemm.py --scaling, the GEMM alone, us a call):
torch._scaled_mm with rowwise scales (a scale per token and per weight row: kiln's FP8
scheme) is slow between 64 and ~384 rows on weights of 4096 rows, as slow at 128 rows as
at 512: the O projection (4096 x 4096) 18.3 us at 128 rows against 8.5 with tensorwise
scales, the down projection (4096 x 14336) 46.4 against 21.3; with the activations'
quantization included the FP8 layer is no faster than bf16's F.linear there.
`use_fast_accum` does not change it. So at those shapes the GEMM runs with tensorwise
scales of 1 into float32 (the sums as the rowwise GEMM forms them) and one small kernel
applies the scales, y = acc * x_scale[m] * w_scale[n] (+ bias), in the order
kiln.kernels.fp8's epilogue does: the same bits as the rowwise path up to the order of
the float32 sums.

Measured with the activations' quantization included (`fp8_gemm.py`, the "auto" column,
H200, 26th session, us a call, off / on): the down projection 41.1 / 26.8 at 96 rows,
41.4 / 28.9 at 128, 43.0 / 34.0 at 192, 44.3 / 38.6 at 256; the O projection 15.8 / 12.9 at
96 and 15.8 / 13.8 at 128; the four GEMMs of a Llama-3.1-8B layer 114.9 / 95.5 us at 96
rows, 112.7 / 99.4 at 128, 152.4 / 140.6 at 192. From 256 rows the O and QKV projections
lose (QKV 16.9 / 19.8 at 256), so the window stops there; at 384 the sum is even. The FP8
engine GPU tests pass with it; end-to-end throughput not yet timed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("KILN_FP8_MID_TENSORWISE", "1") != "0"
MIN_ROWS, MAX_ROWS, MAX_ROWS_LONG_K, MAX_N = 65, 192, 256, 8192  # measured windows (above)
_ONES: dict[torch.device, torch.Tensor] = {}


def use(M: int, N: int, K: int) -> bool:
    """Whether fp8_linear takes this path: not turned off, 65-192 rows (256 where K > N, the
    down projection's shape), weights of at most 8192 rows (the gate-up projection's 28672
    gain nothing), N and K as _scaled_mm needs."""
    top = MAX_ROWS_LONG_K if K > N else MAX_ROWS
    return ENABLED and MIN_ROWS <= M <= top and N <= MAX_N and N % 16 == 0 and K % 16 == 0


def _ones(device: torch.device) -> torch.Tensor:
    """A [1] float32 one on the device, made once outside any CUDA-graph capture."""
    one = _ONES.get(device)
    if one is None:
        one = torch.ones(1, dtype=torch.float32, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _ONES[device] = one
    return one


@triton.jit
def _scale_kernel(acc_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, N, stride_acc, stride_out,
                  XS_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[m, n] = acc[m, n] * x_scale[m] * w_scale[n] (+ bias[n]) in out's dtype."""
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.load(acc_ptr + m * stride_acc + cols, mask=mask, other=0.0)
    x_scale = tl.load(xs_ptr + m) if XS_PER_ROW else tl.load(xs_ptr)
    y = acc * x_scale * tl.load(ws_ptr + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def tensorwise_fp8_linear(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                          weight_scale: torch.Tensor, dtype: torch.dtype,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x_q [M, K] e4m3 with x_scale [M, 1] (or [1]) float32, weight [N, K] e4m3 with
    weight_scale [N] -> [M, N] in dtype: the float32 sums from _scaled_mm (tensorwise,
    scales 1), then the scales (and bias) applied by _scale_kernel."""
    M, N = x_q.shape[0], weight.shape[0]
    one = _ones(x_q.device)
    acc = torch._scaled_mm(x_q, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    out = torch.empty(M, N, dtype=dtype, device=x_q.device)
    if M:
        block = min(triton.next_power_of_2(N), 1024)
        _scale_kernel[(M, triton.cdiv(N, block))](
            acc, x_scale.reshape(-1).float(), weight_scale.reshape(-1), bias, out, N,
            acc.stride(0), out.stride(0), XS_PER_ROW=x_scale.numel() == M,
            HAS_BIAS=bias is not None, BLOCK_N=block, num_warps=4)
    return out
