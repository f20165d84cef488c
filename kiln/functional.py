"""One entry per hot op. Dispatches to a Triton kernel on CUDA, the torch reference elsewhere.

Layers call ops only through this module, so a new kernel is wired in one place.
Set KILN_TRITON=0 to force the reference path everywhere (for debugging). Kernel
modules are imported on first CUDA use only, so CPU runs never need triton.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import TYPE_CHECKING

import torch

from kiln.kernels import reference as ref

if TYPE_CHECKING:
    from kiln.layers.attention import AttentionMetadata


def _triton(x: torch.Tensor) -> bool:
    if not x.is_cuda or os.environ.get("KILN_TRITON", "1") == "0":
        return False
    _require_triton()
    return True


@functools.cache
def _require_triton() -> None:
    """On a GPU kiln's kernels are Triton kernels: say how to get it, once."""
    if importlib.util.find_spec("triton") is None:
        from kiln.errors import KilnError
        from kiln.extras import missing_extra_message

        raise KilnError(f"running on a GPU {missing_extra_message('triton')} "
                        "(or set KILN_TRITON=0 to use the slow torch reference ops)")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    quant: object = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm; with `residual`, fuses the residual add and returns (normed, x + residual).
    quant (an FP8Quant of the FP8 linear taking the output): on a GPU the output comes
    quantized (an FP8Act) by the same kernel; elsewhere as is (the linear quantizes it)."""
    if _triton(x):
        from kiln.kernels import rms_norm as kernel

        quant = quant if x.dim() == 2 else None
        if residual is None:
            return kernel.rms_norm(x, weight, eps, quant)
        return kernel.add_rms_norm(x, residual, weight, eps, quant)
    if residual is None:
        return ref.rms_norm(x, weight, eps)
    return ref.add_rms_norm(x, residual, weight, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b. On the CPU a weight prepacked by prepack_cpu_linears goes through oneDNN
    from PACKED_MIN_ROWS rows (2-3.5x faster at 8 rows than a plain GEMM's repacking)."""
    if packed is not None and not x.is_cuda and x.numel() >= PACKED_MIN_ROWS * x.shape[-1]:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias,
                                               "none", [], "")
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return torch.nn.functional.linear(x, weight, bias)


# Below 4 rows the plain weight (MKL's GEMV) is faster. SmolLM2 on the 2-core CPU, ms a
# decode step plain / packed: 1 row 37 / 44, 2 rows 37 / 46, 3 rows 41 / 48, 4 rows 57 / 49.
PACKED_MIN_ROWS = int(os.environ.get("KILN_CPU_PACK_MIN_ROWS", "4"))


@functools.cache
def _onednn_packer():
    """torch's oneDNN weight packing, if this build has it and it works (the ops are
    internal to torch: checked once before kiln relies on them)."""
    if not torch.backends.mkldnn.is_available():
        return None
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    try:
        w, x = torch.randn(8, 4), torch.randn(3, 4)
        if reorder is None or not torch.allclose(linear(x, w, None, reorder(w, 8)), x @ w.T,
                                                 atol=1e-5):
            return None
    except (RuntimeError, AttributeError):
        return None
    return reorder


def pack_cpu_weight(weight: torch.Tensor, rows_hint: int = 8) -> torch.Tensor | None:
    """A float32 CPU weight [N, K] packed for `linear` (None where packing is off:
    KILN_CPU_PACK=0, another dtype or device, or no oneDNN)."""
    if os.environ.get("KILN_CPU_PACK", "1") == "0" or weight.is_cuda or \
            weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    reorder = _onednn_packer()
    return None if reorder is None else reorder(weight.detach(), rows_hint)


def prepack_cpu_linears(model: torch.nn.Module, rows_hint: int = 8) -> int:
    """Give every float32 linear weight of a CPU model a oneDNN-packed copy
    (`packed_weight`, read by `linear`); KILN_CPU_PACK=0 turns it off. Returns how many
    were packed (0 where this torch has no oneDNN packing: plain GEMMs then). Integer and
    FP8 layers pack the float weight they keep on the CPU on first use instead."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(module, "packs_on_cpu", False) and isinstance(weight, torch.Tensor):
            packed = pack_cpu_weight(weight, rows_hint)
            if packed is None:
                continue
            module.packed_weight = packed
            count += 1
    return count


def silu_and_mul(x: torch.Tensor, quant: object = None) -> torch.Tensor:
    """x = [gate | up] -> silu(gate) * up (SwiGLU); quant: as rms_norm's."""
    if _triton(x):
        from kiln.kernels import silu_mul as kernel

        if quant is not None and x.dim() == 2:
            return kernel.act_mul_quant(x, quant)
        return kernel.silu_and_mul(x)
    return ref.silu_and_mul(x)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float) -> torch.Tensor:
    """LayerNorm over the last dim (torch's kernel on every device)."""
    return torch.nn.functional.layer_norm(x, weight.shape, weight, bias, eps)


def gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate=approximate)


def gelu_tanh_and_mul(x: torch.Tensor, quant: object = None) -> torch.Tensor:
    """x = [gate | up] -> gelu_tanh(gate) * up (GeGLU: Gemma); quant: as rms_norm's."""
    if _triton(x):
        from kiln.kernels import silu_mul as kernel

        if quant is not None and x.dim() == 2:
            return kernel.act_mul_quant(x, quant, gelu_tanh=True)
        return kernel.gelu_tanh_and_mul(x)
    return ref.gelu_tanh_and_mul(x)


def rotary_and_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, head_dim: int, k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None, rotate_k: bool = True,
    step_cache: dict | None = None, kv_finite: bool = False,
) -> torch.Tensor:
    """Neox rotary on q and k, k and v written into the paged cache; returns rotary(q).

    q [T, heads*head_dim], k and v [T, kv_heads*head_dim] (any row stride, e.g. slices of
    the fused QKV output); cos_sin [max_pos, head_dim] float32 = [cos | sin]; slots < 0
    are not written (padding tokens). 1-byte caches (float8_e4m3fn, int8) store
    k / k_scale[head] and v / v_scale[head] (float32 scales [kv_heads]).
    rotate_k=False caches k as it comes (attention sinks: paged_attention's key_rotary
    rotates it when read). step_cache (the step's AttentionMetadata.host_cache): where the
    CPU path keeps what every layer of the step would derive alike; kv_finite: the CPU
    path writes NaN / inf as finite numbers (the pool's promise, see AttentionMetadata).
    """
    if _triton(q):
        from kiln.kernels.rotary_kv import rotary_and_write_kv as kernel

        return kernel(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, head_dim,
                      k_scale, v_scale, rotate_k)
    _usual_layout(k_cache, v_cache)
    return ref.rotary_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache,
                                   slot_mapping, head_dim, k_scale, v_scale, rotate_k,
                                   step_cache, kv_finite)


def _usual_layout(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if v_cache.shape != k_cache.shape:
        raise ValueError("a V cache stored transposed inside its blocks (KILN_KV_V_TRANSPOSED) "
                         "is read by the GPU kernels only")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None, sliding_window: int | None = None,
                    softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
                    key_rotary: torch.Tensor | None = None, out: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Causal attention of q [T, heads, d] over each sequence's paged context.

    1-byte caches are read as value * k_scale[head] / v_scale[head]. sliding_window W:
    a query sees its last W positions; softcap c: scores -> c * tanh(score / c);
    alibi_slopes [heads] float32: ALiBi biases slope * (key pos - query pos).
    key_rotary (attention sinks): the rotary table [max_pos, head_dim]; the cache holds K
    before rotary and key n of a sequence is rotated at position n as it is read.

    On CUDA a decode step (max_query_len == 1: token i is sequence i) takes the
    split-K decode kernel, whose launch depends only on static shapes (batch rows and
    block-table width), so it can be captured in a CUDA graph; anything else takes the
    varlen prefill kernel. out: where to write the result (piecewise CUDA graphs read it
    from a fixed buffer).
    """
    result = _paged_attention(q, k_cache, v_cache, meta, scale, k_scale, v_scale,
                              sliding_window, softcap, alibi_slopes, key_rotary, out)
    if out is not None and result is not out:
        out.copy_(result)
    return result if out is None else out


# A mixed step's leading decode rows take the decode kernel (paged_attention_mixed; H200,
# FP8 1000 / 1000: prompt steps 8.28 s vs 8.61 s on the prefill kernel, out tok/s +1.1%).
# KILN_MIXED_DECODE_ROWS=0 sends them to the prefill kernel with the prompts.
MIXED_DECODE_ROWS = os.environ.get("KILN_MIXED_DECODE_ROWS", "1") != "0"
GREEDY_KERNEL = os.environ.get("KILN_GREEDY_KERNEL", "1") != "0"  # 0: torch.argmax on GPUs


def leading_decode_rows(meta: AttentionMetadata) -> int:
    """How many sequences at the head of a mixed step have one query token (decode rows:
    the scheduler puts the running requests first), when prompt sequences follow them and
    the step's host copy of query_start_loc is there; else 0. Counted once a step."""
    found = meta.host_cache.get("leading_decode_rows")
    if found is None:
        starts, found = meta.query_starts_host, 0
        while found + 1 < len(starts) and starts[found + 1] - starts[found] == 1:
            found += 1
        if found + 1 >= len(starts):  # no prompt after them (or no host copy)
            found = 0
        meta.host_cache["leading_decode_rows"] = found
    return found


def _paged_attention(q, k_cache, v_cache, meta, scale, k_scale, v_scale, sliding_window,
                     softcap, alibi_slopes, key_rotary, out):
    if _triton(q):
        common = dict(k_scale=k_scale, v_scale=v_scale, sliding_window=sliding_window,
                      softcap=softcap, alibi_slopes=alibi_slopes, key_rotary=key_rotary,
                      out=out)
        if meta.max_query_len == 1:
            from kiln.kernels.attention_decode import paged_attention_decode

            return paged_attention_decode(q, k_cache, v_cache, meta.block_tables,
                                          meta.seq_lens, scale, **common)
        from kiln.kernels import attention_sdpa as sdpa
        from kiln.kernels.attention_prefill import paged_attention_mixed, paged_attention_prefill

        decode_rows = leading_decode_rows(meta) if MIXED_DECODE_ROWS else 0
        if sdpa.ENABLED and sdpa.usable(q, k_cache, v_cache, meta, decode_rows, k_scale,
                                        softcap, alibi_slopes, key_rotary, sliding_window):
            return sdpa.paged_attention_sdpa(q, k_cache, v_cache, meta, scale, decode_rows,
                                             out, k_scale, v_scale, sliding_window)
        if decode_rows:
            return paged_attention_mixed(q, k_cache, v_cache, meta.block_tables,
                                         meta.query_start_loc, meta.seq_lens,
                                         meta.max_query_len, scale, decode_rows, **common)
        return paged_attention_prefill(q, k_cache, v_cache, meta.block_tables,
                                       meta.query_start_loc, meta.seq_lens,
                                       meta.max_query_len, scale, **common)
    _usual_layout(k_cache, v_cache)
    if meta.max_query_len == 1 and len(meta.seq_lens_host) == q.shape[0] > 1:
        return ref.paged_attention_decode(q, k_cache, v_cache, meta.block_tables,
                                          meta.seq_lens_host, scale, k_scale, v_scale,
                                          sliding_window, softcap, alibi_slopes, key_rotary,
                                          step_cache=meta.host_cache,
                                          kv_finite=meta.kv_finite)
    return ref.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.query_starts_host,
                               meta.seq_lens_host, scale, k_scale, v_scale, sliding_window,
                               softcap, alibi_slopes, key_rotary)


def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 [T, k], expert ids [T, k]) from router logits [T, E] (torch ops on
    every device: E is small and softmax + topk are single kernels)."""
    return ref.moe_route(router_logits, top_k, renormalize)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None
              ) -> torch.Tensor:
    """SwiGLU experts weighted by the router; see reference. On CUDA: tokens sorted by
    expert once, then one grouped GEMM per projection (kernels/moe.py). With scales, the
    experts are FP8 (W8A8, inputs quantized per token)."""
    if _triton(x):
        from kiln.kernels.moe import fused_moe as kernel

        return kernel(x, w13, w2, topk_weights, topk_ids, w13_scale=w13_scale,
                      w2_scale=w2_scale)
    return ref.fused_moe(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3fn [M, K], float32 scale [M, 1]); see reference."""
    if _triton(x):
        from kiln.kernels.fp8_quant import quantize_fp8_per_token as kernel

        return kernel(x)
    return ref.quantize_fp8_per_token(x)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               weight_float: torch.Tensor | None = None,
               packed: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 FP8 GEMM: x [..., K] (16/32-bit) @ weight [N, K] e4m3fn -> [..., N] in x.dtype.

    weight_scale [N] float32 per output row; input_scale None quantizes x per token,
    a [1] tensor statically. On CUDA: the faster of torch._scaled_mm and a Triton kernel
    for the shape; elsewhere the exact reference (weight_float: a cached weight.float()).
    """
    shape = x.shape
    x2 = x if isinstance(x, ref.FP8Act) else x.reshape(-1, shape[-1])  # FP8Act: 2-D
    if _triton(x):
        from kiln.kernels.fp8 import fp8_linear as kernel

        y = kernel(x2, weight, weight_scale, input_scale, bias)
    else:
        y = ref.fp8_linear(x2, weight, weight_scale, input_scale, bias, weight_float, packed)
    return y.view(*shape[:-1], weight.shape[0])


def int_weight_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      weight_offset: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                      weight_float: torch.Tensor | None = None,
                      packed: torch.Tensor | None = None) -> torch.Tensor:
    """W4A16 / W8A16: x [..., K] @ dequant(weight)^T -> [..., N] in x.dtype, the weight
    int8 [N, K] or two 4-bit values a byte (uint8 [N, K // 2]) with float32 group scales
    and offsets (see reference.dequantize_int_weight). On CUDA a Triton kernel that
    dequantizes inside the K loop; elsewhere the reference (weight_float: a cached
    dequantized weight)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if _triton(x):
        from kiln.kernels.int_gemm import int_weight_linear as kernel

        y = kernel(x2, weight, weight_scale, weight_offset, bias)
    else:
        y = ref.int_weight_linear(x2, weight, weight_scale, weight_offset, bias, weight_float,
                                  packed)
    return y.view(*shape[:-1], weight.shape[0])


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """INT8 W8A8: x [..., K] quantized per token @ weight [N, K] int8 (scale [N] per
    output row) -> [..., N] in x.dtype. On CUDA the Triton kernels around torch._int_mm
    (kiln.kernels.int8_gemm.int8_linear chooses), else the reference (the same integer
    sums)."""
    if isinstance(x, ref.Int8Act):  # quantized by the norm / SiLU-mul before (on CUDA)
        from kiln.kernels.int8_gemm import int8_linear as kernel

        return kernel(x, weight, weight_scale, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    M, K = x2.shape
    N = weight.shape[0]
    if x.is_cuda and K % 8 == 0 and N % 8 == 0 and os.environ.get("KILN_TRITON", "1") != "0":
        if os.environ.get("KILN_INT8_FUSED", "1") != "0":  # =0: the torch chain below
            from kiln.kernels.int8_gemm import int8_linear as kernel

            return kernel(x2, weight, weight_scale, bias).view(*shape[:-1], N)
        x_q, x_scale = ref.quantize_int8_per_token(x2)
        if M <= 16:
            x_q = torch.nn.functional.pad(x_q, (0, 0, 0, 17 - M))
        acc = torch._int_mm(x_q, weight.t())[:M]
        y = acc.float() * x_scale * weight_scale.view(1, -1)
        if bias is not None:
            y = y + bias.float()
        y = y.to(x.dtype)
    else:
        y = ref.int8_linear(x2, weight, weight_scale, bias)
    return y.view(*shape[:-1], N)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax [B] int64 of logits [B, V] (the first of equal largest values, NaN largest)."""
    if GREEDY_KERNEL and _triton(logits):
        from kiln.kernels.sampling import greedy_tokens as kernel

        return kernel(logits)
    return logits.argmax(dim=-1)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, min_p: torch.Tensor, seeds: torch.Tensor,
                  steps: torch.Tensor) -> torch.Tensor:
    """Token ids [B] int64 from logits [B, V] with per-row parameters [B], no host sync.

    temperature <= 0 is greedy; top_k <= 0, top_p >= 1, min_p <= 0 switch a filter off.
    Draws use the counter-based noise of (seeds, steps), identical on both paths.
    """
    if _triton(logits):
        from kiln.kernels.sampling import sample_tokens as kernel

        return kernel(logits, temperature, top_k, top_p, min_p, seeds, steps)
    return ref.sample_tokens(logits, temperature, top_k, top_p, min_p, seeds, steps)
