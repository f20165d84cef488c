"""Compile every kernel for Hopper (sm_90) on any machine, no GPU needed, and report what
the compiler made of it: registers, local-memory stack (spills), 16-byte loads, async
copies and tensor-core instructions.

    python -m kiln.kernels.compile_check [out.json]

Arguments are specialised the way triton's JIT does at launch (pointers 16-byte aligned,
ints divisible by 16 marked so, ints equal to 1 made constants), with Llama-3.1-8B
shapes, so the code is what an H100 would run. Triton must not be in interpreter mode.
"""

from __future__ import annotations

import collections
import inspect
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

from kiln.kernels import (
    attention_decode,
    attention_decode_heads,
    attention_prefill,
    gemv_swap,
    moe,
    rms_norm,
    rotary_kv,
    sampling,
    silu_mul,
)

INSTRUCTIONS = ("ld.global.v4", "cp.async", "cp.async.bulk", "mma.sync", "wgmma.mma_async",
                "griddepcontrol")


@dataclass
class CompileReport:
    kernel: str
    variant: str
    num_warps: int
    registers: int
    stack_bytes: int
    instructions: dict[str, int]


def _compile(fn: Any, values: dict[str, Any], constexprs: dict[str, Any], num_warps: int,
             num_stages: int, maxnreg: int | None = None, fp_fusion: bool = True) -> Any:
    """The sm_90 compiled kernel; values: argument -> '*dtype' for a pointer or an example
    number; others -> 4096. fp_fusion False: the launch option enable_fp_fusion=False (no
    multiply-add contracted into an FMA)."""
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    constexprs = dict(constexprs)
    for i, (name, param) in enumerate(inspect.signature(fn.fn).parameters.items()):
        value = values.get(name, 4096)
        if name not in constexprs and fn.params[i].is_constexpr:
            if name in values:
                constexprs[name] = value  # a compile-time parameter given with the values
            elif param.default is not inspect.Parameter.empty:
                constexprs[name] = param.default  # a compile-time option left at its default
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(value, str) and value.startswith("tensordesc"):
            signature[name] = value  # a host TensorDescriptor (TMA), as the launcher sees it
        elif isinstance(value, str):
            signature[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = GluonASTSource if getattr(fn, "is_gluon", lambda: False)() else ASTSource
    return triton.compile(source(fn, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages,
                                   **({"maxnreg": maxnreg} if maxnreg else {}),
                                   **({} if fp_fusion else {"enable_fp_fusion": False})})


def _cuobjdump(kernel: Any, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        return subprocess.run([triton.knobs.nvidia.cuobjdump.path, flag, cubin.name],
                              capture_output=True, text=True, check=True).stdout


def compile_sm90(fn: Any, values: dict[str, Any], constexprs: dict[str, Any], num_warps: int,
                 num_stages: int = 2, variant: str = "", maxnreg: int | None = None
                 ) -> CompileReport:
    """values: argument -> '*dtype' for a pointer or an example number; others -> 4096;
    maxnreg: a register cap, as a launch's maxnreg= sets it."""
    kernel = _compile(fn, values, constexprs, num_warps, num_stages, maxnreg)
    usage = _cuobjdump(kernel, "--dump-resource-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    assert found is not None, usage
    ptx = kernel.asm["ptx"]
    return CompileReport(fn.fn.__name__.strip("_"), variant, num_warps, int(found[1]),
                         int(found[2]), {op: ptx.count(op + ".") for op in INSTRUCTIONS})


def main_loop_sass(fn: Any, values: dict[str, Any], constexprs: dict[str, Any],
                   num_warps: int, num_stages: int = 2) -> collections.Counter:
    """The SASS opcodes of the kernel's main loop (the longest backward branch), counted:
    for a kernel bound by instruction issue rather than memory (the one-row integer GEMV),
    instructions per weight is what to drive down, and it can be counted without a GPU."""
    sass = _cuobjdump(_compile(fn, values, constexprs, num_warps, num_stages), "-sass")
    lines = [(int(m[1], 16), m[2]) for m in
             re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
    loop = None
    for addr, text in lines:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target[1], 16) < addr and \
                (loop is None or addr - int(target[1], 16) > loop[1] - loop[0]):
            loop = (int(target[1], 16), addr)
    assert loop is not None, "no loop in the kernel"
    return collections.Counter(
        re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
        for addr, text in lines if loop[0] <= addr <= loop[1])


def rotary_launches() -> list[tuple]:
    """compile_sm90's (kernel, values, constexprs, warps, stages) of the two rotary launches
    at the Llama-3.1-8B shape: kiln.kernels.rotary_kv's kernel (one token's 32 + 8 heads of
    128) and the QKV GEMV with the rotary + KV write in its epilogue (gemv_swap, ROPE)."""
    bf = "*bf16"
    cfg = gemv_swap.swap_config(1, 6144, 4096)
    return [(rotary_kv._rotary_kv_kernel, {
        "q_ptr": bf, "k_ptr": bf, "v_ptr": bf, "pos_ptr": "*i64", "cos_sin_ptr": "*fp32",
        "k_cache_ptr": bf, "v_cache_ptr": bf, "slot_ptr": "*i64", "q_out_ptr": bf,
        "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "num_heads": 32, "num_kv_heads": 8,
        "half": 64, "block_size": 16, "head_dim_arg": 128, "stride_vd": 1}, {
        "BLOCK_H": 32, "BLOCK_KH": 8, "BLOCK_D": 64, "BLOCK_P": 0, "PDL": False,
        "ROTATE_K": True}, 4, 3), (gemv_swap._gemv_swap_kernel, {
        "x_ptr": bf, "r_ptr": bf, "nw_ptr": bf, "res_out_ptr": bf, "w_ptr": bf,
        "bias_ptr": bf, "out_ptr": bf, "part_ptr": "*fp32", "count_ptr": "*i32", "M": 3,
        "eps": 1e-5, "N": 6144, "K": 4096, "stride_xm": 4096, "stride_rm": 4096,
        "stride_ro": 4096, "stride_wn": 4096, "stride_om": 4096, "pos_ptr": "*i64",
        "cs_ptr": "*fp32", "kc_ptr": bf, "vc_ptr": bf, "slot_ptr": "*i64", "num_heads": 32,
        "num_kv_heads": 8, "block_size": 16, "stride_cs": 128, "stride_cb": 16384,
        "stride_cslot": 1024, "stride_ch": 128, "stride_vs": 1024, "stride_vh": 128,
        "stride_vd": 1}, {
        "NORM": 0, "ACT": 0, "HAS_BIAS": False, "BLOCK_W": 64, "BLOCK_T": 16,
        "BLOCK_K": cfg.block_k, "NORM_BLOCK": 4096, "EVEN_K": True, "EVEN_N": True,
        "SPLIT_K": 1, "LATE_NORM": False, "PRE_PASS": False, "INTERPRET": False,
        "PDL": True, "ROPE_HALF": 64}, cfg.num_warps, cfg.num_stages)]


def reports() -> list[CompileReport]:
    """The launch configurations the launchers pick at Llama-3.1-8B shapes (bf16)."""
    bf = "*bf16"
    out = [compile_sm90(silu_mul._silu_mul_kernel, {
        "x_ptr": bf, "out_ptr": bf, "inter": 14336, "stride_x": 28672, "stride_out": 14336,
    }, {"BLOCK": 2048, "GELU_TANH": False, "PDL": False}, 8)]
    out.append(compile_sm90(silu_mul._silu_mul_kernel, {
        "x_ptr": bf, "out_ptr": bf, "inter": 14336, "stride_x": 28672, "stride_out": 14336,
    }, {"BLOCK": 2048, "GELU_TANH": True, "PDL": False}, 8, variant="gelu_tanh"))
    norm = {"x_ptr": bf, "res_ptr": bf, "w_ptr": bf, "out_ptr": bf, "res_out_ptr": bf,
            "eps": 1e-5, "num_rows": 77}
    out.append(compile_sm90(rms_norm._rms_norm_kernel, norm, {
        "BLOCK_R": 1, "BLOCK_N": 4096, "HAS_RESIDUAL": True, "PDL": False}, 8,
        variant="hidden+residual"))
    out.append(compile_sm90(rms_norm._rms_norm_kernel, {**norm, "n_cols": 128}, {
        "BLOCK_R": 16, "BLOCK_N": 128, "HAS_RESIDUAL": False, "PDL": False}, 4,
        variant="per-head"))
    # FP8 engines: the output quantized for the W8A8 GEMM after (per token)
    out.append(compile_sm90(rms_norm._rms_norm_kernel, {
        **norm, "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "static_scale_ptr": "*fp32"}, {
        "BLOCK_R": 1, "BLOCK_N": 4096, "HAS_RESIDUAL": True, "PDL": False, "QUANT": 1,
        "Y_DTYPE": tl.bfloat16, "DEPENDENTS": True}, 8, variant="residual+fp8"))
    out.append(compile_sm90(silu_mul._act_mul_quant_kernel, {
        "x_ptr": bf, "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "static_scale_ptr": "*fp32",
        "inter": 14336, "stride_x": 28672, "stride_q": 14336,
    }, {"BLOCK": 16384, "ONE_TILE": True, "QUANT": 1, "GELU_TANH": False,
        "INTERPRET": False, "DEPENDENTS": True}, 8, variant="fp8"))
    rotary = {
        "q_ptr": bf, "k_ptr": bf, "v_ptr": bf, "pos_ptr": "*i64", "cos_sin_ptr": "*fp32",
        "k_cache_ptr": bf, "v_cache_ptr": bf, "slot_ptr": "*i64", "q_out_ptr": bf,
        "num_heads": 32, "num_kv_heads": 8, "half": 64, "block_size": 16, "stride_q": 6144,
        "stride_k": 6144, "stride_v": 6144, "stride_cs": 128, "stride_cb": 16384,
        "stride_cs_slot": 1024, "stride_ch": 128, "head_dim_arg": 128, "stride_vs": 1024,
        "stride_vh": 128, "stride_vd": 1,
    }
    for rotate_k in (True, False):  # False: attention sinks cache K before rotary
        out.append(compile_sm90(rotary_kv._rotary_kv_kernel, rotary, {
            "BLOCK_H": 32, "BLOCK_KH": 8, "BLOCK_D": 64, "BLOCK_P": 0, "ROTATE_K": rotate_k},
            4, variant="" if rotate_k else "unrotated-k"))
    # Partial rotary: Phi-2 (head_dim 80, 32 rotated), GPT-2 (64, none rotated).
    for variant, half, block_d, block_p in (("phi-2", 16, 16, 64), ("gpt2", 0, 1, 64)):
        out.append(compile_sm90(rotary_kv._rotary_kv_kernel, {
            "q_ptr": bf, "k_ptr": bf, "v_ptr": bf, "pos_ptr": "*i64", "cos_sin_ptr": "*fp32",
            "k_cache_ptr": bf, "v_cache_ptr": bf, "slot_ptr": "*i64", "q_out_ptr": bf,
            "num_heads": 32, "num_kv_heads": 32, "half": half, "block_size": 16,
            "stride_q": 7680, "stride_k": 7680, "stride_v": 7680, "stride_cs": 32,
            "stride_cb": 40960, "stride_cs_slot": 2560, "stride_ch": 80, "head_dim_arg": 80,
            "stride_vs": 2560, "stride_vh": 80, "stride_vd": 1,
        }, {"BLOCK_H": 32, "BLOCK_KH": 32, "BLOCK_D": block_d, "BLOCK_P": block_p,
            "ROTATE_K": True}, 4,
            variant=variant))
    attn = {"q_ptr": bf, "k_cache_ptr": bf, "v_cache_ptr": bf, "out_ptr": bf,
            "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "block_tables_ptr": "*i32",
            "query_start_ptr": "*i32", "seq_lens_ptr": "*i32", "qk_scale": 0.1,
            "stride_qh": 128, "stride_oh": 128, "stride_kb": 16384, "stride_ks": 1024,
            # stride_bt is not specialised at launch (do_not_specialize): no divisibility
            "stride_kh": 128, "stride_bt": 511, "window": 4096, "softcap": 72.1,
            "alibi_ptr": "*fp32", "cos_sin_ptr": "*fp32", "stride_cs": 128}
    shape = {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_D": 128, "DOT_PREC": "tf32",
             "WINDOW": False, "SOFTCAP": False, "ALIBI": False, "ROPE_K": False}
    sinks = {"ROPE_K": True}  # attention sinks: keys rotated as read
    gemma2 = {"WINDOW": True, "SOFTCAP": True}  # sliding window + soft-capping
    for block_m, warps in ((128, 8), (16, 4)):
        out.append(compile_sm90(attention_prefill._prefill_kernel, attn, {
            **shape, "BLOCK_M": block_m, "BLOCK_N": 64}, warps, variant=f"BLOCK_M={block_m}"))
    out.append(compile_sm90(attention_prefill._prefill_kernel, attn, {
        **shape, **gemma2, "BLOCK_M": 128, "BLOCK_N": 64}, 8, variant="window+softcap"))
    out.append(compile_sm90(attention_prefill._prefill_kernel, attn, {
        **shape, "ALIBI": True, "BLOCK_M": 128, "BLOCK_N": 64}, 8, variant="alibi"))
    out.append(compile_sm90(attention_prefill._prefill_kernel, attn, {
        **shape, **sinks, "BLOCK_M": 128, "BLOCK_N": 64}, 8, variant="sinks"))
    fp8_cache = {**attn, "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv",
                 "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
    out.append(compile_sm90(attention_prefill._prefill_kernel, fp8_cache, {
        **shape, **sinks, "BLOCK_M": 128, "BLOCK_N": 128}, 8, variant="sinks+fp8kv"))
    for cache, dtype, name in ((attn, "bf16", "TMA bs=64"), (fp8_cache, "fp8e4nv",
                                                            "fp8kv TMA bs=64")):
        desc = f"tensordesc<{dtype}[1,64,128]>"  # paged_tma: whole 64-token blocks a tile
        out.append(compile_sm90(attention_prefill._prefill_kernel, {
            **cache, "k_desc": desc, "v_desc": desc, "stride_kb": 65536}, {
            **shape, "BLOCK_SIZE": 64, "BLOCK_M": 128, "BLOCK_N": 64, "HEAVY_FIRST": True,
            "TMA": True}, 8, 3, variant=name))
    for splits in (1, 32):
        out.append(compile_sm90(attention_decode._decode_kernel, attn, {
            **shape, "BLOCK_G": 16, "BLOCK_N": 64, "NUM_SPLITS": splits}, 4,
            variant=f"splits={splits}"))
    out.append(compile_sm90(attention_decode._decode_kernel, attn, {
        **shape, **gemma2, "BLOCK_G": 16, "BLOCK_N": 64, "NUM_SPLITS": 32}, 4,
        variant="window+softcap"))
    out.append(compile_sm90(attention_decode._decode_kernel, attn, {
        **shape, "ALIBI": True, "BLOCK_G": 16, "BLOCK_N": 64, "NUM_SPLITS": 32}, 4,
        variant="alibi"))
    out.append(compile_sm90(attention_decode._decode_kernel, attn, {
        **shape, **sinks, "BLOCK_G": 16, "BLOCK_N": 64, "NUM_SPLITS": 32}, 4,
        variant="sinks"))
    out.append(compile_sm90(attention_decode._decode_kernel, fp8_cache, {
        **shape, **sinks, "BLOCK_G": 16, "BLOCK_N": 64, "NUM_SPLITS": 32}, 4,
        variant="sinks+fp8kv"))
    out.append(compile_sm90(attention_decode._decode_kernel, fp8_cache, {  # decode_config's
        **shape, "BLOCK_G": 16, "BLOCK_N": 64, "NUM_SPLITS": 1, "PREFETCH": 1}, 2, 3,
        variant="fp8kv"))
    out.append(compile_sm90(attention_decode._decode_kernel, fp8_cache, {  # V transposed
        **shape, "BLOCK_G": 16, "BLOCK_N": 64, "NUM_SPLITS": 1, "PREFETCH": 1, "V_T": True},
        2, 3, variant="fp8kv V_T"))
    out.append(compile_sm90(attention_decode._decode_kernel, fp8_cache, {  # its launch
        **shape, "BLOCK_G": 16, "BLOCK_N": 128, "NUM_SPLITS": 1, "PREFETCH": 1, "V_T": True},
        2, 3, variant="fp8kv V_T 128"))
    out.append(compile_sm90(attention_decode._decode_kernel, fp8_cache, {  # at batch 1
        **shape, "BLOCK_G": 16, "BLOCK_N": 64, "NUM_SPLITS": 8, "PREFETCH": 1, "V_T": True},
        4, 2, variant="fp8kv V_T splits=8"))
    out.append(compile_sm90(attention_decode._decode_kernel, {  # int8's launch (27th)
        **fp8_cache, "k_cache_ptr": "*i8", "v_cache_ptr": "*i8"}, {
        **shape, "BLOCK_G": 16, "BLOCK_N": 128, "NUM_SPLITS": 1, "V_T": True}, 2, 3,
        variant="int8kv V_T 128"))
    out.append(compile_sm90(attention_prefill._prefill_kernel, fp8_cache, {
        **shape, "BLOCK_M": 128, "BLOCK_N": 128, "HEAVY_FIRST": True, "V_T": True}, 8, 2,
        variant="fp8kv V_T"))
    int8_cache = {**fp8_cache, "k_cache_ptr": "*i8", "v_cache_ptr": "*i8"}
    out.append(compile_sm90(attention_prefill._prefill_kernel, int8_cache, {
        **shape, "BLOCK_M": 128, "BLOCK_N": 128, "HEAVY_FIRST": True, "V_T": True}, 8, 2,
        variant="int8kv V_T"))
    out.append(compile_sm90(attention_decode._decode_kernel, int8_cache, {  # V as words
        **shape, "BLOCK_G": 16, "BLOCK_N": 64, "NUM_SPLITS": 1}, 4, 2, variant="int8kv"))
    unused = ("part_out_ptr", "part_lse_ptr", "query_start_ptr", "alibi_ptr", "cos_sin_ptr",
              "stride_cs", "ALIBI", "ROPE_K")  # the several-heads kernel takes none of them
    for cache, warps, stages, pre, name in ((attn, 4, 2, 0, "heads=4"),
                                            (fp8_cache, 2, 3, 1, "fp8kv heads=4")):
        out.append(compile_sm90(attention_decode_heads._decode_heads_kernel, {
            **{k: v for k, v in fp8_cache.items() if k not in unused},
            "k_cache_ptr": cache["k_cache_ptr"], "v_cache_ptr": cache["v_cache_ptr"]}, {
            **{k: v for k, v in shape.items() if k not in unused},
            "BLOCK_G": 16, "BLOCK_N": 64, "HEADS": 4, "PREFETCH": pre}, warps, stages,
            variant=name))
    out.append(compile_sm90(attention_decode._decode_kernel, fp8_cache, {  # capped registers
        **shape, "BLOCK_G": 16, "BLOCK_N": 64, "NUM_SPLITS": 1}, 2, variant="fp8kv maxnreg=168",
        maxnreg=168))
    out.append(compile_sm90(attention_decode._reduce_kernel, attn, {
        "HEAD_DIM": 128, "BLOCK_N": 64, "BLOCK_D": 128, "NUM_SPLITS": 32, "WINDOW": False}, 2))
    fused = {"count_ptr": "*i32"}  # splits combined in the decode kernel (attention_splits)
    out.append(compile_sm90(attention_decode._decode_kernel, {**attn, **fused}, {
        **shape, "BLOCK_G": 16, "BLOCK_N": 64, "NUM_SPLITS": 8, "FUSED": True}, 4,
        variant="fused reduce"))
    out.append(compile_sm90(attention_decode._decode_kernel, {**fp8_cache, **fused}, {
        **shape, "BLOCK_G": 16, "BLOCK_N": 64, "NUM_SPLITS": 8, "PREFETCH": 1, "V_T": True,
        "FUSED": True}, 4, 2, variant="fp8kv V_T fused reduce"))
    out.append(compile_sm90(attention_decode._decode_kernel, {**attn, **fused}, {
        **shape, "BLOCK_G": 16, "BLOCK_N": 64, "NUM_SPLITS": 8, "FUSED": True, "PDL": True},
        4, variant="fused reduce PDL"))  # KILN_ATTN_PDL
    # bf16 decode linears (gemv_swap's launches at one row): QKV, down (2 K splits)
    swap = {"x_ptr": bf, "r_ptr": bf, "nw_ptr": bf, "res_out_ptr": bf, "w_ptr": bf,
            "bias_ptr": bf, "out_ptr": bf, "part_ptr": "*fp32", "count_ptr": "*i32", "M": 3,
            "eps": 1e-5}
    for n, k, cfg in ((6144, 4096, gemv_swap.swap_config(1, 6144, 4096)),
                      (4096, 14336, gemv_swap.swap_config(1, 4096, 14336))):
        out.append(compile_sm90(gemv_swap._gemv_swap_kernel, {
            **swap, "N": n, "K": k, "stride_xm": k, "stride_rm": k, "stride_ro": k,
            "stride_wn": k, "stride_om": n}, {
            "NORM": 0, "ACT": 0, "HAS_BIAS": False, "BLOCK_W": cfg.block_w, "BLOCK_T": 16,
            "BLOCK_K": cfg.block_k, "NORM_BLOCK": 4096, "EVEN_K": True, "EVEN_N": True,
            "SPLIT_K": cfg.split_k, "LATE_NORM": False, "PRE_PASS": False,
            "INTERPRET": False}, cfg.num_warps, cfg.num_stages, variant=f"{n}x{k}"))
    cfg = gemv_swap.swap_config(1, 4096, 4096)  # O, launched with PDL behind attention
    out.append(compile_sm90(gemv_swap._gemv_swap_kernel, {
        **swap, "N": 4096, "K": 4096, "stride_xm": 4096, "stride_rm": 4096, "stride_ro": 4096,
        "stride_wn": 4096, "stride_om": 4096}, {
        "NORM": 0, "ACT": 0, "HAS_BIAS": False, "BLOCK_W": 64, "BLOCK_T": 16,
        "BLOCK_K": cfg.block_k, "NORM_BLOCK": 4096, "EVEN_K": True, "EVEN_N": True,
        "SPLIT_K": 1, "LATE_NORM": False, "PRE_PASS": False, "INTERPRET": False,
        "PDL": True}, cfg.num_warps, cfg.num_stages, variant="PDL"))
    cfg = gemv_swap.swap_config(1, 28672, 4096)  # gate-up with act(gate) * up (GLU)
    out.append(compile_sm90(gemv_swap._gemv_swap_kernel, {
        **swap, "N": 14336, "K": 4096, "stride_xm": 4096, "stride_rm": 4096,
        "stride_ro": 4096, "stride_wn": 4096, "stride_om": 14336}, {
        "NORM": 0, "ACT": 0, "HAS_BIAS": False, "BLOCK_W": 64, "BLOCK_T": 16,
        "BLOCK_K": cfg.block_k, "NORM_BLOCK": 4096, "EVEN_K": True, "EVEN_N": True,
        "SPLIT_K": 1, "LATE_NORM": False, "PRE_PASS": False, "INTERPRET": False,
        "PDL": True, "GLU": 1}, cfg.num_warps, cfg.num_stages, variant="GLU"))
    out.append(compile_sm90(*rotary_launches()[1], variant="ROPE"))
    # Mixtral-8x7B's up projection (H 4096 -> 2 x 14336), top-2 routing.
    out.append(compile_sm90(moe._moe_gemm_kernel, {
        "a_ptr": bf, "w_ptr": bf, "out_ptr": bf, "sorted_pairs_ptr": "*i32",
        "block_experts_ptr": "*i32", "weights_ptr": "*fp32", "a_scale_ptr": bf,
        "w_scale_ptr": bf, "N": 28672, "K": 4096,
        "num_pairs": 2048, "num_experts": 8, "stride_am": 4096, "stride_we": 117440512,
        "stride_wn": 4096, "stride_om": 28672,
    }, {"TOP_K": 2, "A_PER_TOKEN": True, "MUL_WEIGHT": False, "BLOCK_M": 64, "BLOCK_N": 64,
        "BLOCK_K": 64, "DOT_PREC": "tf32"}, 4, num_stages=3))
    # The same with FP8 experts (e4m3 operands, per-row scales), as _grouped_gemm launches it.
    out.append(compile_sm90(moe._moe_gemm_kernel, {
        "a_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "out_ptr": bf, "sorted_pairs_ptr": "*i32",
        "block_experts_ptr": "*i32", "weights_ptr": "*fp32", "a_scale_ptr": "*fp32",
        "w_scale_ptr": "*fp32", "N": 28672, "K": 4096, "num_pairs": 2048, "num_experts": 8,
        "stride_am": 4096, "stride_we": 117440512, "stride_wn": 4096, "stride_om": 28672,
    }, {"TOP_K": 2, "A_PER_TOKEN": True, "MUL_WEIGHT": False, "BLOCK_M": 64, "BLOCK_N": 64,
        "BLOCK_K": 128, "DOT_PREC": "tf32", "FP8_SCALES": True, "PROMOTE_K": 128}, 4,
        num_stages=3, variant="fp8"))
    for logits in ("*fp32", "*bf16"):  # greedy_tokens' chunks
        out.append(compile_sm90(sampling._argmax_chunk_kernel, {
            "logits_ptr": logits, "val_ptr": "*fp32", "idx_ptr": "*i32", "vocab": 128256,
            "stride_row": 128256}, {"CHUNKS": 32, "BLOCK": 4096}, 8, variant=logits[1:]))
    out.append(compile_sm90(sampling._argmax_merge_kernel, {
        "val_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*i64", "vocab": 128256},
        {"CHUNKS": 32, "BLOCK_C": 32}, 1))
    out.append(compile_sm90(sampling._sample_kernel, {
        "logits_ptr": "*fp32", "temperature_ptr": "*fp32", "top_k_ptr": "*i64",
        "top_p_ptr": "*fp32", "min_p_ptr": "*fp32", "seeds_ptr": "*i64", "steps_ptr": "*i64",
        "out_ptr": "*i64", "cand_ptr": "*fp32", "theta_ptr": "*fp32", "vocab": 128256,
        "stride_row": 128256,
    }, {"GOLDEN": sampling._GOLDEN, "MIX1": sampling._MIX1, "MIX2": sampling._MIX2,
        "BLOCK_V": 4096, "NUM_BINS": sampling.NUM_BINS, "CANDIDATES": sampling.CANDIDATES,
        "STORE_THETA": False}, 8))
    return out


def main(argv: list[str]) -> None:
    results = reports()
    print(f"{'kernel':18} {'variant':16} {'warps':>5} {'regs':>4} {'stack':>5}  instructions")
    for r in results:
        ops = ", ".join(f"{op}={n}" for op, n in r.instructions.items() if n)
        print(f"{r.kernel:18} {r.variant:16} {r.num_warps:5} {r.registers:4} "
              f"{r.stack_bytes:5}  {ops}")
    if argv:
        with open(argv[0], "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
