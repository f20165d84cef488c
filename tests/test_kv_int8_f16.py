"""KILN_INT8_KV_F16 (kiln/kernels/kv_operands.py, the default; =0 turns it off): an int8
KV cache's attention products in float16, the tiles converted with integer ops (the
word-pair path) or one prmt / sub.f16x2 sequence a register (int8_f16) instead of the
compiler's conversions.

CPU: in Triton's interpreter (the worker of tests/test_kernels_kvquant.py) a float16
model's decode and prefill attention over an int8 cache give the same bits with the
option and without it (the values reach the products as the same float16 integers); the
word-pair decoding is checked for every int8 value in every byte of a word. sm_90: the
decode kernel's main loop compiled both ways (no GPU): no I2F, fewer instructions.

    pytest tests/test_kv_int8_f16.py
    pytest -m gpu tests/test_kernels_kvquant.py   # the GPU check (KILN_INT8_KV_F16=0: the old path)
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tests.test_kernels_kvquant import _quantized_batch, interp  # noqa: F401

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[gpu]')")


def _set_option(on: bool) -> None:
    """KILN_INT8_KV_F16 in this (interpreter) process: read at call time there."""
    import triton.language as tl

    from kiln.kernels import kv_operands, paged

    kv_operands.INT8_KV_F16 = paged.INT8_KV_F16 = tl.constexpr(on)


def check_same_bits() -> None:
    from kiln.kernels.attention_decode import paged_attention_decode
    from kiln.kernels.attention_prefill import paged_attention_prefill

    outs: dict[bool, list[torch.Tensor]] = {}
    for on in (False, True):
        _set_option(on)
        got = []
        for heads, kv_heads, head_dim in ((8, 2, 64), (4, 2, 42)):  # V as words / as bytes
            seq_lens, q_lens = [1, 17, 100, 64], [1] * 4
            q, k_q, v_q, k_s, v_s, tables, _ = _quantized_batch(
                seq_lens, q_lens, heads, kv_heads, head_dim, torch.float16, torch.int8)
            for splits in (1, 4):
                got.append(paged_attention_decode(
                    q, k_q, v_q, tables, torch.tensor(seq_lens).int(), head_dim ** -0.5,
                    num_splits=splits, block_n=16, k_scale=k_s, v_scale=v_s))
            seq_lens, q_lens = [17, 100, 33], [17, 30, 33]
            q, k_q, v_q, k_s, v_s, tables, starts = _quantized_batch(
                seq_lens, q_lens, heads, kv_heads, head_dim, torch.float16, torch.int8)
            got.append(paged_attention_prefill(
                q, k_q, v_q, tables, torch.tensor(starts).int(), torch.tensor(seq_lens).int(),
                max(q_lens), head_dim ** -0.5, block_m=16, block_n=16, k_scale=k_s,
                v_scale=v_s))
        outs[on] = got
    _set_option(False)
    for i, (want, have) in enumerate(zip(outs[False], outs[True], strict=True)):
        assert have.dtype == torch.float16 and torch.equal(have, want), \
            (i, (have.float() - want.float()).abs().max())


def test_float16_attention_same_bits(interp) -> None:  # noqa: F811
    interp(check_same_bits)


if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from kiln.kernels.kv_operands import int8_halves, int8_word_pairs, unbias

    @triton.jit
    def _decode_words(w_ptr, out_ptr, N: tl.constexpr):
        """Words of four int8 values -> their float16 values in order, by the pairs."""
        u = tl.load(w_ptr + tl.arange(0, N)).to(tl.uint32, bitcast=True)
        even, odd = int8_word_pairs(u), int8_word_pairs(u >> 8)
        offs = tl.arange(0, N) * 4
        tl.store(out_ptr + offs, unbias(int8_halves(even, False)))
        tl.store(out_ptr + offs + 1, unbias(int8_halves(odd, False)))
        tl.store(out_ptr + offs + 2, unbias(int8_halves(even, True)))
        tl.store(out_ptr + offs + 3, unbias(int8_halves(odd, True)))


def check_word_pairs() -> None:
    values = torch.arange(-128, 128, dtype=torch.int8)
    words = torch.stack([values, values.roll(1), values.roll(2), values.roll(3)], 1)
    out = torch.empty(256 * 4, dtype=torch.float16)
    _decode_words[(1,)](words.contiguous().view(torch.int32).view(-1), out, N=256)
    assert torch.equal(out, words.reshape(-1).to(torch.float16))


def test_word_pairs_every_value(interp) -> None:  # noqa: F811
    interp(check_word_pairs)


_SASS = """
import json, sys
from kiln.kernels import attention_decode
from kiln.kernels.compile_check import main_loop_sass
args = {"q_ptr": "*bf16", "out_ptr": "*bf16", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
        "qk_scale": 0.1, "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "stride_qh": 128,
        "stride_oh": 128, "stride_kb": 16384, "stride_ks": 1024, "stride_kh": 128,
        "stride_bt": 511, "k_cache_ptr": "*i8", "v_cache_ptr": "*i8", "part_out_ptr": "*fp32",
        "part_lse_ptr": "*fp32", "window": 4096, "softcap": 72.1, "alibi_ptr": "*fp32",
        "cos_sin_ptr": "*fp32", "stride_cs": 128}
shape = {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_G": 16, "BLOCK_N": 128,
         "BLOCK_D": 128, "DOT_PREC": "tf32", "WINDOW": False, "SOFTCAP": False, "ALIBI": False,
         "ROPE_K": False, "NUM_SPLITS": 1, "PREFETCH": 0, "V_T": True}
print(json.dumps(main_loop_sass(attention_decode._decode_kernel, args, shape, 2, 3)))
"""


def test_compiles_for_hopper_without_conversions() -> None:
    """The int8 decode launch of a bfloat16 model (128-key tiles, 2 warps, V transposed),
    sm_90 SASS of the main loop with the option off and on, each in a fresh process (the
    option is read at import): on, no I2F and fewer instructions (1,682 vs 2,039 when
    written), the same MMAs."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    import json

    counts = {}
    for on in ("0", "1"):
        env = {**os.environ, "KILN_INT8_KV_F16": on}
        run = subprocess.run([sys.executable, "-c", _SASS], env=env, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        counts[on] = json.loads(run.stdout.strip().splitlines()[-1])
    off, on = counts["0"], counts["1"]
    assert on.get("I2F", 0) == 0 and on["HMMA"] == off["HMMA"], (off, on)
    assert sum(on.values()) < 0.9 * sum(off.values()), (sum(off.values()), sum(on.values()))


