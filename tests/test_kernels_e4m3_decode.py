"""Decode attention over an e4m3 KV cache in each of attention_decode.E4M3_MODES ("old",
"cvt", "qk8", "qk8x1"): CPU checks under the interpreter (tests/test_kernels.py's worker)
and GPU checks at Llama-3.1-8B decode shapes (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import reference as ref
from tests import test_kernels_kvquant as kv

interp = kv.interp  # the fixture: the interpreter worker with the e4m3 conversion patch

# e4m3 decode modes (attention_decode.E4M3_MODES). "cvt" converts exactly, as "old";
# "qk8" rounds q to two e4m3 parts (~8 significant bits, measured <= 1e-3 max |V| here,
# inside kv.ATTN_F16); "qk8x1" to one (4 bits: measured 0.044 max |V| on these peaked random
# scores; 2^-3 still catches a wrong layout or scale, which is off by O(max |V|)). 42:
# head_dim % 4 != 0 falls back to "old"; f32 q and key rotary fall back to "cvt".
E4M3_MODE_TOL = {"cvt": 2.0 ** -8, "qk8": 2.0 ** -8, "qk8x1": 2.0 ** -3}


@pytest.mark.parametrize("e4m3_mode", sorted(E4M3_MODE_TOL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,num_splits", [
    (8, 2, 64, 4), (4, 1, 64, None), (4, 2, 42, 2)])
def test_decode_attention_e4m3_modes(interp, e4m3_mode, dtype, heads, kv_heads, head_dim,
                                     num_splits) -> None:
    atol, rtol = (kv.ATTN_F32[1:] if dtype == torch.float32 and e4m3_mode == "cvt"
                  else (E4M3_MODE_TOL[e4m3_mode], kv.ATTN_F16[2]))
    interp(kv.check_decode, dtype, atol, rtol, kv.FP8, heads, kv_heads, head_dim, num_splits,
           False, e4m3_mode)


@pytest.mark.parametrize("e4m3_mode", ["cvt", "qk8"])
def test_decode_attention_e4m3_modes_key_rotary(interp, e4m3_mode) -> None:
    interp(kv.check_decode, *kv.ATTN_F16, kv.FP8, 8, 2, 64, 4, True, e4m3_mode)



@kv._gpu
@pytest.mark.parametrize("batch,ctx", [(512, 1536), (256, 1000), (64, 2000)])
def test_gpu_decode_attention_e4m3_modes(cache_dtype, batch, ctx) -> None:
    """Llama-3.1-8B decode shapes: "cvt" and "qk8" within the float32 bound ("cvt" feeds
    the same float16 values as "old" to the MMAs), "qk8x1" within 2^-3 max |V|."""
    from kiln.kernels.attention_decode import paged_attention_decode

    if cache_dtype != kv.FP8:
        pytest.skip("the modes apply to e4m3 caches")
    seq_lens = [ctx] * batch
    q, k_q, v_q, k_scale, v_scale, tables, _ = kv._gpu_quantized(seq_lens, [1] * batch, kv.FP8)
    lens = torch.tensor(seq_lens, device="cuda").int()
    scale = kv.HEAD_DIM ** -0.5
    out = {mode: paged_attention_decode(q, k_q, v_q, tables, lens, scale, k_scale=k_scale,
                                        v_scale=v_scale, e4m3_mode=mode)
           for mode in ("old", "cvt", "qk8", "qk8x1")}
    expected = ref.paged_attention(q.float(), k_q, v_q, tables, list(range(batch + 1)),
                                   seq_lens, scale, k_scale, v_scale)
    for mode in ("old", "cvt", "qk8"):
        kv._close_to_f32(mode, out[mode], expected, v_q, v_scale)
    vmax = ref.dequantize_kv(v_q, v_scale, torch.float32).abs().max().item()
    kv.gpu._close("qk8x1", out["qk8x1"].float(), expected, atol=2.0 ** -3 * vmax, rtol=0.0)
