"""Which launch the integer-weight linears make (kiln.kernels.int_gemm.int_weight_linear):
the H200-measured defaults by row count and shape, and the environment overrides the
benchmarks sweep them with. Re-exported by kiln.kernels.int_gemm."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

import torch
import triton

GEMV_ROWS = 4  # KILN_INT_GEMVN (a GEMV launch for 2+ rows) applies up to this many rows


@dataclass(frozen=True)
class IntGemmConfig:
    """One launch: GEMV (block_m 0, split_k splits of K) or tl.dot tiles."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    group_m: int = 8
    prefetch: bool = False  # one-row GEMV: the next K step's loads before this step's math
    nibble_dots: bool = False  # int4 tl.dot tiles: even and odd k multiplied apart
    factored: bool = False  # GEMV: scales once a word (_factored_step); tiles: _factored_dot
    xvec: bool = False  # factored: x read as one vector a word
    words: bool = False  # int4 tl.dot tiles: 32-bit words, values read in place
    fixup: bool = False  # one-row GEMV: K splits summed in the kernel (split_k_fixup)
    digits: bool = False  # x as digit planes: GEMV on dp4a, tiles on int8 tl.dot
    swap: bool = False  # tiles: out^T = w x^T, the weight tile wgmma's register operand
    pipeline: bool = False  # one-row GEMV: loads cp.async num_stages - 1 steps ahead
    magic: bool = False  # int4 tiles, 16-bit x: nibbles to 2^7 + q (bf16) by bit operations
    sum_dot: bool = False  # factored / magic tiles: sums of x by a tl.dot with ones
    pairs: bool = False  # int4 GEMV (1-4 rows), bf16 x: products in bf16 pairs (int_gemv_pairs)


# K steps of the decode-batch tiles where the group is smaller (int_gemm.step_groups):
# several whole groups a step with a [BLOCK_N, GROUPS] scale tile, and launches for them;
# KILN_INT_GROUPED=step: the launches before the 48th session, the group the step. A
# Llama-3.1-8B layer's four linears on an H100 (48th session), us at 8 / 64 rows, groups
# against step: int8 g32 (GGUF Q8_0) 137 / 207 against 231 / 384, int4 g32 with offsets
# (Q4_0 / Q4_1) 130 / 214 against 257 / 320, int8 g16 with offsets (K-quant mixes) 182 /
# 286 against 556 / 971 (bf16 cuBLAS 156 / 162). Loading every element's scale at the
# launch's step instead was 0.03-0.13x bf16 (removed; BENCHMARKS.md)
GROUPED = os.environ.get("KILN_INT_GROUPED") != "step"
# The float tiles without masks where N and K are whole tiles, for the groups (K // scale
# columns) named; None: every group. The K loop of int4 g32 at 64 x 32 x 128 in sm_90 SASS:
# 10.1 instructions a weight against 11.3 with masks (48th session). A Llama-3.1-8B layer,
# cold weights, H100, twice (50th session), us with masks -> without: int8 g32 (GGUF Q8_0)
# 8 rows 141.9 -> 135.6 and 138.6 -> 134.6, 64 rows 214.9 -> 200.9 and 211.6 -> 198.1;
# int4 g32 with offsets (Q4_0 / Q4_1) 8 rows 136.0 -> 127.9 and 132.9 -> 127.7, 64 rows
# 219.5 -> 219.7 and 215.6 -> 216.3; int8 g16 with offsets (K-quant mixes) 8 rows 185.5 ->
# 181.3 and 181.9 -> 180.0, 64 rows 291.3 -> 294.9 and 289.2 -> 292.9 (slower: g16 keeps
# its masks). KILN_INT_EVEN=1: every group, 0: none
EVEN_GROUPS: tuple[int, ...] | None = {"1": None, "0": ()}.get(
    os.environ.get("KILN_INT_EVEN", ""), (32,))


def wgmma_rows(value: str) -> tuple[tuple[int, int], ...]:
    """The row ranges (first, last) that take kiln.kernels.int_wgmma's Gluon kernel on Hopper
    (int4), from KILN_INT_WGMMA: "" (the default) and "1" 5-255, "0" none, "A-B" rows A to B,
    "A-B,C-D" both; anything else none, with a warning. At 33-64 and 129-255 rows only gate_up
    and down (wgmma_takes). 55th session, an H100, a layer's four linears in 128-row blocks
    (int_wgmma.wgmma_config), us at 65 / 128 / 200 rows (the picks' sums): groups of 128 276.2 /
    215.2 / 420.3 against 343.9 / 283.3 / 444.3 for the 54th session's rule (64-row blocks for
    gate_up and down up to 128 rows, the dequantized weight otherwise; bf16 cuBLAS 173.4 / 178.2
    / 190.9), groups of 32 277.4 / 211.5 / 432.6 against 363.5 / 296.7 / 516.6. Timed end to end
    on an H100 (int4 out tok/s; 53rd session): 16 requests of 128 in / 256 out 2,972.7 / 2,968.1
    at 5-64 against 2,886.2 / 2,898.5 at 5-8 and 33-64 (bf16 2,679.4); 32 requests 4,957.0 /
    4,955.4 against 4,802.5 / 4,808.6 (bf16 4,607.9); 8 requests 1,691.4 / 1,701.9 against
    1,516.1 / 1,495.6 off at 5-8 (bf16 1,392.6); 64 x 512 / 256 5,809.9 against 5,314.9 off
    (bf16 5,725.9; 52nd)."""
    if value in ("", "1"):
        return ((5, 255),)
    if value == "0":
        return ()
    ranges = []
    for part in value.split(","):
        first, _, last = part.strip().partition("-")
        if not (first.isdigit() and last.isdigit()):
            import warnings

            warnings.warn(f"KILN_INT_WGMMA={value!r} is not 0, 1 or A-B[,C-D] (rows A to B); "
                          "ignored", stacklevel=2)
            return ()
        ranges.append((int(first), int(last)))
    return tuple(ranges)


WGMMA_ROWS = wgmma_rows(os.environ.get("KILN_INT_WGMMA", ""))
# One int4 row by kiln.kernels.int4_gemv_tma (TMA-fed) on Hopper, the GLU and rotary
# epilogues of the pairs GEMV then not taken (kiln.layers.weight_only): by default in groups
# of 32 (GGUF's Q4 layouts; KILN_INT4_GEMV_TMA=1: every group, 0: none). 54th session, an
# H200, Llama-3.1-8B at batch 1 (128 in / 256 out, out tok/s): groups of 32 372.3 / 372.4
# against 317.8 / 317.5 for the pairs GEMV with its epilogues (o and down alone 334.6 /
# 334.9, gate_up too 363.3 / 363.3); groups of 128 313.2 / 313.3 against 415.6 / 415.7
# (a layer's four linears 73.5 us against 55.4; in groups of 32, 61.6 against 89.5)
GEMV_TMA = os.environ.get("KILN_INT4_GEMV_TMA", "32")
# The merged gate-up through the TMA GEMV's own GLU epilogue and the fused QKV through its
# rotary + KV-write epilogue (kiln.kernels.int4_gemv_tma; KILN_INT4_GEMV_TMA_GLU=0 /
# KILN_INT4_GEMV_TMA_ROPE=0: unfused, then SiLU*mul / rotary). 55th session, an H100,
# int4 in groups of 32 at batch 1 (128 in / 256 out, out tok/s): 319.8 / 320.4 with both
# against 311.0 / 310.5 without
GEMV_TMA_GLU = os.environ.get("KILN_INT4_GEMV_TMA_GLU") != "0"
GEMV_TMA_ROPE = os.environ.get("KILN_INT4_GEMV_TMA_ROPE") != "0"
# In groups of 128 too for an LM head (HEAD_ROWS outputs or more; KILN_INT4_GEMV_TMA_HEAD=0:
# not). 59th session, H100, batch 1 with --quantize-lm-head: 394.0 / 394.2 / 393.9 tok/s
# against 392.5 / 391.9 / 391.9; at o, qkv, gate_up or o + down it loses end to end (386.4,
# 388.7, 365.1, 342.1 against 391.3). KILN_INT4_GEMV_TMA_SHAPES=NxK,...: only those shapes
HEAD_ROWS = 65536
GEMV_TMA_HEAD = os.environ.get("KILN_INT4_GEMV_TMA_HEAD") != "0"
GEMV_TMA_SHAPES = {tuple(int(v) for v in s.split("x"))
                   for s in os.environ.get("KILN_INT4_GEMV_TMA_SHAPES", "").split(",") if s}
# At 33-64 and 129-255 rows the Gluon kernel takes only the big linears of a layer (52nd
# session, H100, 64 rows: gate_up 64.1 us and down 46.6 against the Triton tiles' 85.7 and
# 53.0; qkv and o, split 2-4 ways, 30.8 and 27.2 against 26.6 and 18.9. 55th, H100, 200
# rows, groups of 128: gate_up 206.2 against the dequantized weight's 233.8, down 125.3
# against 119.8; qkv 65.4 against 54.3, o 61.8 against 34.5); at 65-128 rows all four
# (128-row blocks; 128 rows: qkv 37.9 against 44.8 in 64-row blocks and 31.8 dequantized)
WGMMA_MIN_WEIGHTS = 1 << 25


@functools.cache
def wgmma_module():
    """kiln.kernels.int_wgmma, or None where this Triton has no Gluon for Hopper (older
    than 3.6: the Triton tiles then take every row count). (An int8 version, its weights
    exact in bfloat16, was slower than the Triton tiles at 8-32 rows on an H200 and 0.92x
    bf16 at 64: removed in the 54th session, BENCHMARKS.md.)"""
    return _gluon_module("int_wgmma")


@functools.cache
def _gemv_tma_module():
    return _gluon_module("int4_gemv_tma")


def _gluon_module(name: str):
    """kiln.kernels.NAME, or None where its import fails (no Gluon in this Triton) or this
    Triton is older than the 3.6 the Gluon kernels are written against (Gluon's API
    changes between releases: an older one would fail at the first launch)."""
    import importlib

    if tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2]) < (3, 6):
        return None
    try:
        return importlib.import_module("kiln.kernels." + name)
    except ImportError:
        return None


def tma_takes(group: int, n: int) -> bool:
    """Whether the TMA GEMV is the one-row int4 launch for a weight of n outputs in this
    group (GEMV_TMA, GEMV_TMA_HEAD), where it takes the product at all."""
    return GEMV_TMA == "1" or GEMV_TMA == "32" and (
        group == 32 or GEMV_TMA_HEAD and n >= HEAD_ROWS)


def tma_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor):
    """kiln.kernels.int4_gemv_tma.w4_gemv_tma where GEMV_TMA takes this one-row int4
    product's group (and GEMV_TMA_SHAPES, where set, its shape) and the kernel takes the
    product, else None."""
    group = x.shape[-1] // max(1, scale.shape[-1])
    if GEMV_TMA_SHAPES and (weight.shape[0], x.shape[-1]) not in GEMV_TMA_SHAPES:
        return None
    if not (x.is_cuda and tma_takes(group, weight.shape[0])):
        return None
    module = _gemv_tma_module()
    return module.w4_gemv_tma if module is not None and \
        module.gemv_tma_eligible(x, weight, scale) else None


# From this many rows (prefill) the weight is dequantized into a 16-bit scratch buffer and
# multiplied by cuBLAS: the dequantization is paid once per call instead of once per row
# tile (kiln.kernels.int_gemm.dequantize_weight)
DEQUANT_ROWS = 256
# KILN_INT_DEQUANT_FIRST=0: 65-255 rows in the Triton tiles (before the 54th session)
DEQUANT_FIRST = os.environ.get("KILN_INT_DEQUANT_FIRST") != "0"


def dequant_first(M: int, N: int, K: int, G: int, bits: int, x: torch.Tensor) -> bool:
    """Whether a product of 65 to DEQUANT_ROWS - 1 rows on a GPU takes the dequantized
    weight and cuBLAS too (where the Gluon kernel does not take it): all but int8, which
    keeps Triton tiles (per channel: x as digit planes, int_gemm_config; grouped: where the
    128 x 128 tiles fill the SMs). 54th session, an H200, Llama-3.1-8B, us at 128 / 65
    rows: int4 g128 qkv 40.4 / 38.5 against the tiles' 96.9 / 94.8, o 27.5 / 25.2 against
    97.3 / 96.6, down 92.0 / 88.8 against 358.5 / 345.6; int8 down 94.1 / 91.0 against
    265.1 / 239.3, gate_up 185.8 / 183.8 against the float tiles' 119.8 / 116.6 (bf16
    cuBLAS, a layer: 134.1 / 125.3)."""
    if not (DEQUANT_FIRST and 64 < M < DEQUANT_ROWS):
        return False
    if bits == 8 and G == K:
        return False  # the digit-plane tiles (int_gemm_config)
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    return not (bits == 8 and tiles >= _sms(x.device))


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def wgmma_takes(M: int, N: int, K: int) -> bool:
    """Whether an int4 product of M rows goes to kiln.kernels.int_wgmma (if eligible)."""
    return any(a <= M <= b for a, b in WGMMA_ROWS) and \
        (M <= 32 or 64 < M <= 128 or N * K >= WGMMA_MIN_WEIGHTS)


# The one-row int4 pairs GEMV in the launches of the 31st session's sweep where it beat the
# older default (o, down, gate_up; KILN_INT_ROW_TILES=0: not). INT4 batch 1 on an H200 (32nd
# session): 399.7 tok/s against 392.1 / 392.3 without
ROW_TILES = os.environ.get("KILN_INT_ROW_TILES", "1") != "0"


def int_gemm_config(M: int, N: int, K: int, device: torch.device, bits: int = 8,
                    group: int = 0, dtype: torch.dtype | None = None,
                    pairs_ok: bool = True) -> IntGemmConfig:
    """A launch for an [M, K] x [N, K]^T product (bits: of the weight; group: its
    quantization group along K, 0 or K per channel; dtype: x's, None for bfloat16;
    pairs_ok False: x cannot be read as bfloat16 pairs, so no pairs GEMV for 2-4 rows).
    Overrides for benchmarks, one row:
    KILN_INT_GEMV1="block_n,block_k,split_k,warps,stages[,prefetch[,factored[,xvec[,fixup[,
    digits[,pipeline[,pairs]]]]]]]"; 2-4 rows: KILN_INT_GEMVN="block_n,block_k,split_k,warps,
    stages[,factored[,pairs]]" (factored: kiln.kernels.int_gemv_rows; pairs: int4 with
    bfloat16 x, kiln.kernels.int_gemv_pairs); decode batches (2 <=
    M <= 64): KILN_INT_TILES="block_n,block_k,warps,stages,split_k[,nibble_dots[,words[,
    factored[,digits[,swap[,magic[,sum_dot]]]]]]]". KILN_INT_DIGITS=1: the default
    launches with x as digit planes (IntGemmConfig.digits; beyond where they are the
    default, see below).
    KILN_INT_SWAP=1: decode-batch tiles computed transposed (IntGemmConfig.swap) where the
    float tiles are the default (grouped int8; int4 in groups of 32 or 64); KILN_INT_MAGIC=0:
    int4 in groups of 128 back on the float tiles; KILN_INT_PIPELINE=1: one-row GEMVs
    with their K loops software-pipelined (IntGemmConfig.pipeline): measured slower
    (seventeenth session: int4 gate_up 40.0 vs 36.2 us), an A/B switch (SmoothQuant's
    dp4a GEMV, where it is faster, pipelines by default; =0 turns that off).
    """
    digits = os.environ.get("KILN_INT_DIGITS") == "1"
    if M == 1:
        override = os.environ.get("KILN_INT_GEMV1")
        if override:
            bn, bk, split, warps, stages, *flags = (int(v) for v in override.split(","))
            pf, factored, xvec, fixup, digits, pipe, pairs = (
                bool(v) for v in [*flags, *[0] * 7][:7])
            return IntGemmConfig(0, bn, bk, warps, stages, split_k=split, prefetch=pf,
                                 factored=factored, xvec=xvec, fixup=fixup, digits=digits,
                                 pipeline=pipe, pairs=pairs)
        # Measured on an H200 at the Llama-3.1-8B shapes (BENCHMARKS.md, fourteenth and
        # fifteenth sessions): scales applied once a word and x read as one vector a word
        # (factored, xvec). int4 in 64 x 128 tiles, K in 8 splits: 81.6 us a layer (qkv + o
        # + gate_up + down) vs 112.8 for the plain 32 x 256 x 4 splits; int8 in 32 x 256 x
        # 4: 83.7 vs 91.9. Where N is small (qkv, o, down: few N blocks) the K splits are
        # summed by the last one (fixup): int4 o 8.7 vs 10.2 us, down 21.0 vs 23.0; int8 o
        # 8.5 vs 10.3, down 20.6 vs 22.5; not at gate_up (N 28,672: 38.2 vs 36.1).
        # int8 where 4096 < N <= 8192 (the 8B's qkv, 6144): 128 x 128, 8 warps, 8 splits,
        # 11.4 / 11.5 us against 13.7 / 13.2 (fifteenth / sixteenth sessions' sweeps).
        # int8 where K > 8192 (the 8B's down, 14,336): 64 x 128 in 8 splits, the next
        # step's loads first (prefetch): 19.9 / 20.0 us against 20.6 / 20.4 (sixteenth /
        # seventeenth). int4 with bfloat16 x: products in bfloat16 pairs
        # (kiln.kernels.int_gemv_pairs; 4.1 SASS instructions a weight against 5.9): a
        # layer 63.3 us against 76.6, batch-1 decode 337.5 / 337.6 tok/s against 294.6 /
        # 294.8 (eighteenth session; KILN_INT_PAIRS=0: the float GEMV)
        pairs = bits == 4 and dtype in (None, torch.bfloat16) and \
            os.environ.get("KILN_INT_PAIRS") != "0"
        wide = bits == 8 and 4096 < N <= 8192
        deep = bits == 8 and K > 8192 and not wide
        block_n, block_k, most = (64, 128, 8) if bits == 4 or deep else (128, 128, 8) \
            if wide else (32, 256, 4)
        if pairs:  # (eighteenth session's sweep) 32 x 256 in 4 splits; K > 8192: 64 x 128 in 16;
            # N > 8192 (gate_up): one split, no zeroed workspace or cast, 26.8 vs 29.3 us
            # (nineteenth session)
            block_n, block_k, most = (64, 128, 16) if K > 8192 else \
                (32, 256, 1 if N > 8192 else 4)
        warps, pipe = 8 if wide else 4, os.environ.get("KILN_INT_PIPELINE") == "1"
        if pairs and ROW_TILES and (N > 8192 or N <= 4096 or K > 8192):
            # 31st session's sweep (benchmarks/int4_row_sweep.py, H200, us): gate_up 16 x
            # 512, 2 warps, one split: 25.1 vs 26.2; o and down 64 x 256 in 8 splits, the
            # K loop pipelined: 7.6 vs 9.0 and 16.5 vs 17.3; qkv kept (9.5: best)
            block_n, block_k, most, warps, pipe = (16, 512, 1, 2, False) if N > 8192 else \
                (64, 256, 8, 4, True)
        if 16 <= group <= (32 if pairs else 16 if bits == 8 else 0) and group < K and GROUPED:
            # the groups swept (48th session, an H100, cold weights, us; GGUF's layouts):
            # int4 g32 gate_up 32 x 256 one split 39.5 (56.5 in the launch above), down 64
            # x 256 in 8 splits 25.3 (38.6), o 10.3 (17.5); int8 g16 with offsets (K-quant
            # mixes) gate_up 16 x 256 pipelined 74.3 (95.2), down 32 x 256 in 4, 8 warps
            # 39.9 (62.2)
            block_n, block_k, most, warps, pipe = (
                (32, 256, 1, 4, False) if N > 8192 else (64, 256, 8, 4, False)) if pairs else \
                (16, 256, 1, 4, True) if N > 8192 else (32, 256, 4, 8, False)
            deep = False
        split = max(1, min(most, triton.cdiv(K, block_k)))
        return IntGemmConfig(0, block_n, block_k, warps, 3, split_k=split,
                             prefetch=deep, factored=True, xvec=True,
                             fixup=split > 1 and N <= 8192, digits=digits, pipeline=pipe,
                             pairs=pairs)
    if M <= GEMV_ROWS and os.environ.get("KILN_INT_GEMVN"):
        bn, bk, split, warps, stages, *flags = (
            int(v) for v in os.environ["KILN_INT_GEMVN"].split(","))
        factored, pairs = (bool(v) for v in [*flags, 0, 0][:2])
        return IntGemmConfig(0, bn, bk, warps, stages, split_k=split, factored=factored,
                             pairs=pairs)
    if M <= GEMV_ROWS and pairs_ok and bits == 4 and dtype in (None, torch.bfloat16) and \
            (M == 2 or N <= 8192) and not digits and os.environ.get("KILN_INT_PAIRS") != "0":
        # int4, bfloat16 x, 2-4 rows: the pairs GEMV (each word unpacked once for all rows):
        # a layer at 2 rows 89.6 us against 125.3 for the magic tiles (bf16 cuBLAS 117.3);
        # at 4 rows qkv 18.5 vs 19.2, o 14.9 vs 15.2, down 35.6 vs 42.1, but gate_up (N
        # 28,672) 47.8 in magic tiles against >= 49.5 (nineteenth session). 3 rows take 4's
        # registers (ROWS a power of two), so the 4-row choice.
        split = 16 if M == 2 and N <= 8192 or K > 8192 else 8
        return IntGemmConfig(0, 64, 128, 4, 3, split_k=split, pairs=True)
    if M <= 64 and os.environ.get("KILN_INT_TILES"):
        bn, bk, warps, stages, split, *flags = (
            int(v) for v in os.environ["KILN_INT_TILES"].split(","))
        nibbles, words, factored, digits, swap, magic, sum_dot = (
            bool(v) for v in [*flags, *[0] * 7][:7])
        return IntGemmConfig(16 if M <= 16 else 32 if M <= 32 else 64, bn, bk, warps, stages,
                             split_k=split, nibble_dots=nibbles, words=words,
                             factored=factored, digits=digits, swap=swap, magic=magic,
                             sum_dot=sum_dot)
    if M <= 64:
        # H200, Llama-3.1-8B shapes, a layer's four linears (BENCHMARKS.md, fifteenth and
        # sixteenth sessions; the launches before in brackets).
        block_m = 16 if M <= 16 else 32 if M <= 32 else 64
        if bits == 8 and group in (0, K) and (M > 16 or N > 8192):
            # int8 per channel on the integer tensor cores, x as digit planes
            # (kiln.kernels.int_gemm_digits; int32 sums over each split, scaled once), one
            # split but where N is small at 17-32 rows: gate_up at 2-16 rows 37.7 us (48.7
            # in 16 x 32 x 128 digit tiles, ~61 factored); a layer at 32 rows 130 (259),
            # at 64 rows 142 (196; bf16 cuBLAS 126)
            if M <= 32:
                block_n, block_k, split = 64, 128, 2 if M > 16 and N <= 4096 else 1
            else:
                block_n, block_k, split = 64 if N > 4096 else 32, 128 if N > 8192 else 256, 1
            return IntGemmConfig(block_m, block_n, block_k, 4, 3, split_k=split, digits=True)
        if bits == 4 and group % 128 == 0 and not digits and dtype in (None, torch.bfloat16) \
                and os.environ.get("KILN_INT_MAGIC") != "0":
            # int4 in groups of 128 (or more): the tile transposed (the weight wgmma's
            # register operand) and unpacked by bit operations (magic): a layer at 4 / 16 /
            # 64 rows 125 / 126 / 190 us against 147 / 147 / 222 for the float tiles
            # (seventeenth session; bf16 cuBLAS 113 / 116 / 125). bfloat16 x only: the
            # float16 variant (2^10 + q) compiles for sm_90 but has not run on a GPU.
            # 33-64 rows where N is large (the 8B's gate_up): x's sums by a tl.dot with
            # ones (sum_dot), 84.8 vs 91.2 us (eighteenth session; qkv, o and down slower)
            return IntGemmConfig(block_m, 64, 128, 4, 3, split_k=2, swap=True, magic=True,
                                 sum_dot=M > 32 and N > 8192)
        if os.environ.get("KILN_INT_SWAP") == "1":
            # the weight tile wgmma's register operand: 128 wide (two wgmma row blocks), K
            # in 4 splits where N is small (the 8B's qkv: 48 column blocks), else 2
            split = 4 if N <= 8192 else 2
            return IntGemmConfig(block_m, 128, 128, 4, 3, split_k=split, factored=bits == 8,
                                 swap=True)
        if 16 <= group < 128 and group < K and not digits and GROUPED:
            # groups of 16-64 (GGUF's layouts), several a K step (see GROUPED above):
            # 32 x 128 tiles, best of nine launches at 8 and 64 rows (48th session)
            return IntGemmConfig(block_m, 32, 128, 4, 3, split_k=_two_splits(K, 128))
        # 2-16 rows: int4 16 x 32 x 128, 152 us at 4 and 16 rows (1,136 at 4 rows: the
        # split-K GEMV; 176.5 at 16); int8 (grouped, or per channel where N <= 8192) 16 x
        # 32 x 256 factored (scales after each K step's dot: _factored_dot). 17-32 rows:
        # int4 64 x 128, 212 us (254 in 32 x 64 x 4 stages). 64 rows: int4 32 x 128 where
        # N is small (qkv, o, down), else 64 x 128, 224 (241). int4 factored and on the
        # digit planes lost at every row count.
        factored = bits == 8 and (M <= 16 or M > 32)
        if M <= 16:
            block_n, block_k, warps, stages = (32, 256, 4, 3) if bits == 8 else (32, 128, 4, 3)
        elif bits == 8:
            block_n, block_k, warps, stages = (64, 128, 4, 3) if M > 32 else (64, 128, 8, 3)
        elif M > 32 and N <= 8192:
            block_n, block_k, warps, stages = 32, 128, 4, 3
        else:
            block_n, block_k, warps, stages = 64, 128, 4, 3
        # K in two splits where each keeps >= 8 K steps, unless the tiles are many
        # (int4 at 16 rows, gate_up's 896 tiles: 62.3 vs 79.7 us in one split)
        split = _two_splits(K, block_k)
        if bits == 4 and M <= 16 and triton.cdiv(N, block_n) >= 256:
            split = 1
        return IntGemmConfig(block_m, block_n, block_k, warps, stages, split_k=split,
                             factored=factored, digits=digits)
    if bits == 8 and group in (0, K) and M < DEQUANT_ROWS and device.type == "cuda":
        # int8 per channel at 65-255 rows on the digit planes: 128 x 128 tiles where they
        # fill the SMs, else 64 x 64 (55th session, an H100, Llama-3.1-8B, us at 65 / 128 /
        # 200 rows: a layer 205.8 / 211.9 / 350.9 against 314.2 / 322.9 / 447.6 for the
        # dequantized weight and the float tiles, bf16 cuBLAS 173.4 / 178.2 / 190.9)
        wide = triton.cdiv(M, 128) * triton.cdiv(N, 128) >= _sms(device)
        return IntGemmConfig(128, 128, 128, 8, 3, digits=True) if wide else \
            IntGemmConfig(64, 64, 128, 4, 3, digits=True)
    return IntGemmConfig(128, 128, 64, 8, 3)


def _two_splits(K: int, block_k: int) -> int:
    """Decode-batch tiles: K in two splits where each keeps >= 8 whole K steps."""
    return 2 if K % (2 * block_k) == 0 and K // (2 * block_k) >= 8 else 1


def split_length(K: int, split_k: int, block_k: int) -> int:
    """Inputs per split of the GEMV: whole K steps."""
    return triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
