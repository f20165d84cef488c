"""Which launch int_weight_linear makes (kiln/kernels/int_gemm.py: the H200-measured
defaults and the benchmarks' overrides), and how the integer kernels compile for sm_90
without a GPU: no stack, tensor-core instructions in the tiles, and the SASS instruction
count of the one-row GEMV's K loop (benchmarks/int_gemv_sass.py's measure)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[gpu]')")


def test_launch_overrides(monkeypatch) -> None:
    """The benchmarks' launch overrides: one row and decode batches (flags optional)."""
    from kiln.kernels import int_gemm

    cpu = torch.device("cpu")
    monkeypatch.setenv("KILN_INT_GEMV1", "64,128,4,4,3,0,1,1")
    assert int_gemm.int_gemm_config(1, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        0, 64, 128, 4, 3, split_k=4, factored=True, xvec=True)
    monkeypatch.setenv("KILN_INT_GEMV1", "64,128,8,4,3,0,1,1,1")
    assert int_gemm.int_gemm_config(1, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        0, 64, 128, 4, 3, split_k=8, factored=True, xvec=True, fixup=True)
    monkeypatch.setenv("KILN_INT_GEMV1", "64,128,8,4,3,0,0,0,0,1")
    assert int_gemm.int_gemm_config(1, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        0, 64, 128, 4, 3, split_k=8, digits=True)
    monkeypatch.setenv("KILN_INT_GEMV1", "64,128,8,4,3,0,1,1,1,0,1")
    assert int_gemm.int_gemm_config(1, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        0, 64, 128, 4, 3, split_k=8, factored=True, xvec=True, fixup=True, pipeline=True)
    monkeypatch.delenv("KILN_INT_GEMV1")
    monkeypatch.setenv("KILN_INT_GEMV1", "64,128,8,4,3,0,1,1,1,0,0,1")
    assert int_gemm.int_gemm_config(1, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        0, 64, 128, 4, 3, split_k=8, factored=True, xvec=True, fixup=True, pairs=True)
    monkeypatch.delenv("KILN_INT_GEMV1")
    monkeypatch.setenv("KILN_INT_PIPELINE", "1")  # the default launch, pipelined
    assert int_gemm.int_gemm_config(1, 4096, 4096, cpu, 4, 128, torch.float16) == \
        int_gemm.IntGemmConfig(0, 64, 128, 4, 3, split_k=8, factored=True, xvec=True,
                               fixup=True, pipeline=True)
    monkeypatch.delenv("KILN_INT_PIPELINE")
    monkeypatch.setenv("KILN_INT_GEMVN", "64,128,8,4,3,1")
    assert int_gemm.int_gemm_config(3, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        0, 64, 128, 4, 3, split_k=8, factored=True)
    monkeypatch.setenv("KILN_INT_TILES", "64,64,4,4,2,0,1")
    assert int_gemm.int_gemm_config(64, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        64, 64, 64, 4, 4, split_k=2, words=True)
    monkeypatch.setenv("KILN_INT_TILES", "32,64,4,4,1")
    assert int_gemm.int_gemm_config(16, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        16, 32, 64, 4, 4)
    monkeypatch.setenv("KILN_INT_TILES", "32,128,4,3,2,0,0,1")
    assert int_gemm.int_gemm_config(5, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        16, 32, 128, 4, 3, split_k=2, factored=True)
    assert int_gemm.int_gemm_config(65, 4096, 4096, cpu, 4).block_m == 128  # not a batch
    monkeypatch.setenv("KILN_INT_TILES", "128,128,4,3,2,0,0,0,0,1")
    assert int_gemm.int_gemm_config(5, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        16, 128, 128, 4, 3, split_k=2, swap=True)
    monkeypatch.setenv("KILN_INT_TILES", "64,128,4,3,2,0,0,0,0,1,1,1")
    assert int_gemm.int_gemm_config(40, 4096, 4096, cpu, 4) == int_gemm.IntGemmConfig(
        64, 64, 128, 4, 3, split_k=2, swap=True, magic=True, sum_dot=True)
    monkeypatch.delenv("KILN_INT_TILES")
    monkeypatch.setenv("KILN_INT_SWAP", "1")  # the transposed tiles' A/B switch
    assert int_gemm.int_gemm_config(5, 28672, 4096, cpu, 4, 32) == int_gemm.IntGemmConfig(
        16, 128, 128, 4, 3, split_k=2, swap=True)
    assert int_gemm.int_gemm_config(40, 4096, 4096, cpu, 8, 32) == int_gemm.IntGemmConfig(
        64, 128, 128, 4, 3, split_k=4, factored=True, swap=True)
    assert int_gemm.int_gemm_config(40, 4096, 4096, cpu, 8).digits  # int8 per channel
    assert not int_gemm.int_gemm_config(1, 4096, 4096, cpu, 4).swap


def test_int4_row_tiles(monkeypatch) -> None:
    """KILN_INT_ROW_TILES (the default since the 32nd session): the one-row int4 pairs GEMV
    in the 31st session's sweep winners at the 8B shapes (gate_up 16 x 512 in one split,
    2 warps; o and down 64 x 256 in 8 splits summed in the kernel, the K loop pipelined),
    qkv as before; off (KILN_INT_ROW_TILES=0), the older launches."""
    from kiln.kernels import int_gemm, int_launch

    cpu = torch.device("cpu")
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
              "down": (4096, 14336)}
    monkeypatch.setattr(int_launch, "ROW_TILES", False)
    before = {k: int_gemm.int_gemm_config(1, n, k_, cpu, 4, 128) for k, (n, k_) in
              shapes.items()}
    monkeypatch.setattr(int_launch, "ROW_TILES", True)
    got = {k: int_gemm.int_gemm_config(1, n, k_, cpu, 4, 128) for k, (n, k_) in
           shapes.items()}
    assert got["qkv"] == before["qkv"]
    assert got["gate_up"] == int_gemm.IntGemmConfig(
        0, 16, 512, 2, 3, split_k=1, factored=True, xvec=True, pairs=True)
    for name in ("o", "down"):
        assert got[name] == int_gemm.IntGemmConfig(
            0, 64, 256, 4, 3, split_k=8, factored=True, xvec=True, fixup=True,
            pipeline=True, pairs=True), name
        assert got[name] != before[name]
    # float16 activations keep the float GEMV's launch, int8 is not taken
    assert int_gemm.int_gemm_config(1, 4096, 4096, cpu, 4, 128, torch.float16) == \
        int_gemm.IntGemmConfig(0, 64, 128, 4, 3, split_k=8, factored=True, xvec=True,
                               fixup=True)
    assert int_gemm.int_gemm_config(1, 4096, 4096, cpu, 8).block_n == 32


def test_int_gemm_default_launches(monkeypatch) -> None:
    """The launches measured fastest on an H200 at the 8B shapes (BENCHMARKS.md, fourteenth
    to sixteenth sessions): one row factored with x as vectors (int4 64 x 128 in up to 8 K
    splits, int8 32 x 256 in 4, summed in the kernel where N is small); decode batches in
    tiles, two K splits where each keeps 8 K steps."""
    from kiln.kernels import int_gemm, int_launch

    cuda = torch.device("cuda")
    cfg = int_gemm.int_gemm_config
    # the one-row int4 pairs launches before KILN_INT_ROW_TILES (its: test_int4_row_tiles)
    monkeypatch.setattr(int_launch, "ROW_TILES", False)
    assert cfg(1, 4096, 4096, cuda, 4) == int_gemm.IntGemmConfig(  # int4, bf16 x: pairs
        0, 32, 256, 4, 3, split_k=4, factored=True, xvec=True, fixup=True, pairs=True)
    assert cfg(1, 4096, 14336, cuda, 4) == int_gemm.IntGemmConfig(
        0, 64, 128, 4, 3, split_k=16, factored=True, xvec=True, fixup=True, pairs=True)
    assert cfg(1, 4096, 4096, cuda, 4, 128, torch.float16) == int_gemm.IntGemmConfig(
        0, 64, 128, 4, 3, split_k=8, factored=True, xvec=True, fixup=True)
    assert cfg(1, 4096, 512, cuda, 4).split_k == 2  # K of two steps: two splits
    assert cfg(1, 4096, 14336, cuda, 8) == int_gemm.IntGemmConfig(  # int8 at the 8B's down
        0, 64, 128, 4, 3, split_k=8, prefetch=True, factored=True, xvec=True, fixup=True)
    assert cfg(1, 4096, 4096, cuda, 8) == int_gemm.IntGemmConfig(
        0, 32, 256, 4, 3, split_k=4, factored=True, xvec=True, fixup=True)
    assert cfg(1, 6144, 4096, cuda, 8) == int_gemm.IntGemmConfig(  # int8 at the 8B's qkv
        0, 128, 128, 8, 3, split_k=8, factored=True, xvec=True, fixup=True)
    # many N blocks: the splits add by atomics; one split: nothing to sum; int4 pairs where
    # N is large (gate_up): one split (nineteenth session)
    assert not cfg(1, 28672, 4096, cuda, 8).fixup and cfg(1, 28672, 4096, cuda, 8).factored
    assert cfg(1, 28672, 4096, cuda, 4) == int_gemm.IntGemmConfig(
        0, 32, 256, 4, 3, split_k=1, factored=True, xvec=True, pairs=True)
    assert not cfg(1, 4096, 128, cuda, 4).fixup
    # int4, bfloat16 x, 2-4 rows: the pairs GEMV (nineteenth session), at 3-4 rows only
    # where N is small; 16 K splits at 2 rows or K > 8192, else 8
    for M, N, K, split in ((2, 4096, 4096, 16), (2, 28672, 4096, 8), (4, 6144, 4096, 8),
                           (3, 4096, 14336, 16), (4, 4096, 4096, 8)):
        for group in (32, 128, 0):
            assert cfg(M, N, K, cuda, 4, group) == int_gemm.IntGemmConfig(
                0, 64, 128, 4, 3, split_k=split, pairs=True)
    # ... unless x cannot be read as pairs, or KILN_INT_PAIRS=0: tiles
    assert not cfg(2, 4096, 4096, cuda, 4, 128, pairs_ok=False).pairs
    monkeypatch.setenv("KILN_INT_PAIRS", "0")
    assert cfg(2, 4096, 4096, cuda, 4, 128).magic
    monkeypatch.delenv("KILN_INT_PAIRS")
    # 2-16 rows otherwise: 16-row tiles, not the float GEMV (6.7x slower at 4 rows,
    # fifteenth session) (int4: one K split where the tiles are many; int8 scales after
    # each step's dot)
    for M in (2, 4, 16):
        assert cfg(M, 4096, 4096, cuda, 4, 32, pairs_ok=False) == int_gemm.IntGemmConfig(
            16, 32, 128, 4, 3, split_k=2)
        assert cfg(M, 4096, 4096, cuda, 8) == int_gemm.IntGemmConfig(
            16, 32, 256, 4, 3, split_k=2, factored=True)
    assert cfg(3, 28672, 4096, cuda, 4, 64) == int_gemm.IntGemmConfig(16, 32, 128, 4, 3,
                                                                    split_k=2)
    # int4 in groups of 128 (or per channel), 2-64 rows (3-4 rows where N is large): the
    # transposed tiles unpacked by bit operations (seventeenth session), KILN_INT_MAGIC=0
    # the float tiles above
    for M, block_m in ((2, 16), (4, 16), (16, 16), (24, 32), (64, 64)):
        for N, K, group in ((28672, 4096, 128), (4096, 14336, 0), (6144, 4096, 4096)):
            if M > 4 or N > 8192:
                assert cfg(M, N, K, cuda, 4, group, pairs_ok=M > 2) == int_gemm.IntGemmConfig(
                    block_m, 64, 128, 4, 3, split_k=2, swap=True, magic=True,
                    sum_dot=M > 32 and N > 8192)  # x's sums on tensor cores: gate_up, 64 rows
    # float16 x (its 2^10 + q variant has not run on a GPU): the float tiles
    assert cfg(4, 4096, 4096, cuda, 4, 128, torch.float16) == int_gemm.IntGemmConfig(
        16, 32, 128, 4, 3, split_k=2)
    monkeypatch.setenv("KILN_INT_MAGIC", "0")
    assert cfg(4, 4096, 4096, cuda, 4, 128, pairs_ok=False) == int_gemm.IntGemmConfig(
        16, 32, 128, 4, 3, split_k=2)
    monkeypatch.delenv("KILN_INT_MAGIC")
    # int8 per channel: integer tensor cores on x's digit planes (sixteenth session) at
    # gate_up's N up to 16 rows, everywhere from 17 rows; one split but where N is small
    # at 17-32 rows
    for M in (2, 16):
        for group in (0, 4096):
            assert cfg(M, 28672, 4096, cuda, 8, group) == int_gemm.IntGemmConfig(
                16, 64, 128, 4, 3, digits=True)
    assert cfg(24, 4096, 4096, cuda, 8) == int_gemm.IntGemmConfig(
        32, 64, 128, 4, 3, split_k=2, digits=True)
    assert cfg(32, 6144, 4096, cuda, 8) == int_gemm.IntGemmConfig(32, 64, 128, 4, 3, digits=True)
    assert cfg(40, 28672, 4096, cuda, 8) == int_gemm.IntGemmConfig(64, 64, 128, 4, 3, digits=True)
    assert cfg(64, 6144, 4096, cuda, 8) == int_gemm.IntGemmConfig(64, 64, 256, 4, 3, digits=True)
    assert cfg(64, 4096, 14336, cuda, 8) == int_gemm.IntGemmConfig(
        64, 32, 256, 4, 3, digits=True)
    # one row in the groups swept (48th session; GGUF's layouts): int4 g32 pairs where
    # N is large one split of 32 x 256, else 64 x 256 in 8; int8 g16 16 x 256 pipelined, else
    # 32 x 256 in 4 splits, 8 warps
    assert cfg(1, 28672, 4096, cuda, 4, 32) == int_gemm.IntGemmConfig(
        0, 32, 256, 4, 3, split_k=1, factored=True, xvec=True, pairs=True)
    assert cfg(1, 4096, 14336, cuda, 4, 32) == int_gemm.IntGemmConfig(
        0, 64, 256, 4, 3, split_k=8, factored=True, xvec=True, fixup=True, pairs=True)
    assert cfg(1, 28672, 4096, cuda, 8, 16) == int_gemm.IntGemmConfig(
        0, 16, 256, 4, 3, split_k=1, factored=True, xvec=True, pipeline=True)
    assert cfg(1, 4096, 14336, cuda, 8, 16) == int_gemm.IntGemmConfig(
        0, 32, 256, 8, 3, split_k=4, factored=True, xvec=True, fixup=True)
    # groups not swept (int4 g64, int8 g32): the launches above
    assert cfg(1, 28672, 4096, cuda, 4, 64) == cfg(1, 28672, 4096, cuda, 4, 128)
    assert cfg(1, 4096, 14336, cuda, 8, 32) == cfg(1, 4096, 14336, cuda, 8, 0)
    assert cfg(1, 4096, 4096, cuda, 4, 128).block_k == 256  # groups of 128: as before
    # groups of 16-64 (GGUF's layouts): 32 x 128 tiles, several groups a K step (48th
    # session); KILN_INT_GROUPED=step: the launches before (int8 factored, the group the step)
    for M, block_m in ((4, 16), (24, 32), (40, 64), (64, 64)):
        for N, K, bits, group in ((28672, 4096, 8, 32), (4096, 14336, 4, 32),
                                  (28672, 4096, 4, 64), (4096, 4096, 8, 16)):
            assert cfg(M, N, K, cuda, bits, group, pairs_ok=False) == \
                int_gemm.IntGemmConfig(block_m, 32, 128, 4, 3, split_k=2)
    assert cfg(8, 4096, 1024, cuda, 8, 32).split_k == 1  # 4 K steps of 256: too few
    monkeypatch.setattr(int_launch, "GROUPED", False)
    assert cfg(4, 28672, 4096, cuda, 8, 32) == int_gemm.IntGemmConfig(
        16, 32, 256, 4, 3, split_k=2, factored=True)
    assert cfg(40, 28672, 4096, cuda, 8, 32) == int_gemm.IntGemmConfig(
        64, 64, 128, 4, 3, split_k=2, factored=True)
    assert cfg(64, 4096, 14336, cuda, 4, 32) == int_gemm.IntGemmConfig(
        64, 32, 128, 4, 3, split_k=2)
    assert cfg(24, 4096, 4096, cuda, 8, 32) == int_gemm.IntGemmConfig(
        32, 64, 128, 8, 3, split_k=2)
    monkeypatch.setattr(int_launch, "GROUPED", True)
    assert not cfg(4, 28672, 4096, cuda, 4).digits and not cfg(40, 28672, 4096, cuda, 4).digits
    assert cfg(64, 4096, 1024, cuda, 8).split_k == 1  # 2 x 4 K steps: too few to split
    assert cfg(300, 4096, 4096, cuda, 8).split_k == 1


def test_compiles_for_hopper(monkeypatch) -> None:
    """The launches int_weight_linear makes on an H200 (132 SMs) at a Llama-3.1-8B shape
    compile for sm_90: the GEMV without spills, tl.dot tiles on tensor cores (wgmma from
    64 rows). Measured: 96-224 registers, no stack, but 8 bytes of stack for int4 at 16
    rows (mma.sync tiles)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    import triton

    from kiln.kernels import int_gemm
    from kiln.kernels.compile_check import compile_sm90

    # the float GEMV's launches (the int4 pairs GEMV's, KILN_INT_ROW_TILES's included: in
    # test_kernels_int_pairs)
    monkeypatch.setenv("KILN_INT_PAIRS", "0")
    N = K = 4096
    for M in (1, 4, 16, 64, 300):
        for bits in (4, 8):  # in groups of 128 (int8 per channel: the digit tiles, below)
            # (2-4 rows of int4 take the pairs GEMV: compiled in test_kernels_int_pairs)
            cfg = int_gemm.int_gemm_config(M, N, K, torch.device("cuda"), bits, 128,
                                           pairs_ok=False)
            meta = dict(BITS=bits, HAS_OFFSET=bits == 4, HAS_BIAS=True, GROUP_TILE=True,
                        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
            gemv = cfg.block_m == 0
            values = {"x_ptr": "*bf16", "w_ptr": "*u8" if bits == 4 else "*i8",
                      "s_ptr": "*fp32", "o_ptr": "*fp32", "bias_ptr": "*bf16",
                      "out_ptr": "*fp32" if gemv else "*bf16", "M": 7, "N": N, "K": K,
                      "G": 128, "stride_xm": K,
                      "K_PER_SPLIT": int_gemm.split_length(K, cfg.split_k, cfg.block_k),
                      "stride_wn": K * bits // 8, "stride_sn": K // 128, "stride_om": N}
            if gemv and M == 1:
                assert cfg.split_k > 1  # a few programs per SM at N = 4096
                meta.update(ATOMIC=True)
                for key in ("M", "stride_xm", "stride_om"):
                    values.pop(key)
                values.update(w_ptr="*i32", stride_wn=K * bits // 32, part_ptr="*fp32",
                              count_ptr="*i32")
                meta.pop("GROUP_TILE")
                meta.update(GROUPS=max(1, cfg.block_k // 128), PREFETCH=cfg.prefetch,
                            FACTORED=cfg.factored, XVEC=cfg.xvec)
                values["W_PER_SPLIT"] = values["K_PER_SPLIT"] // (32 // bits)
                kernel = int_gemm._gemv1_kernel
            elif gemv:
                assert cfg.split_k > 1
                meta.update(ROWS=triton.next_power_of_2(M), ATOMIC=True)
                kernel = int_gemm._gemv_kernel
            else:  # decode batches with K split (M 16, 64), prefill without
                assert (cfg.split_k > 1) == (M <= 64), cfg
                meta.update(BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m, IEEE=False,
                            SPLIT_K=cfg.split_k)
                values.update(part_ptr="*fp32", count_ptr="*i32")
                kernel = int_gemm._gemm_kernel
            r = compile_sm90(kernel, values, meta, cfg.num_warps, cfg.num_stages,
                             variant=f"M{M}-int{bits}")
            assert r.stack_bytes <= (8 if (M, bits) == (16, 4) else 0), r
            if kernel is int_gemm._gemv1_kernel:  # with two K steps' words in registers
                r = compile_sm90(kernel, values, dict(meta, PREFETCH=True, FACTORED=False),
                                 cfg.num_warps, cfg.num_stages,
                                 variant=f"M{M}-int{bits}-prefetch")
                assert r.stack_bytes == 0, r
                # the splits summed by the last one (IntGemmConfig.fixup), out in bf16
                r = compile_sm90(kernel, dict(values, out_ptr="*bf16"),
                                 dict(meta, ATOMIC=False, SPLIT_K=cfg.split_k),
                                 cfg.num_warps, cfg.num_stages, variant=f"M{M}-int{bits}-fixup")
                assert r.stack_bytes == 0, r
                for xvec in (False, True):  # scales once a word (IntGemmConfig.factored)
                    r = compile_sm90(kernel, values, dict(meta, FACTORED=True, XVEC=xvec),
                                     cfg.num_warps, cfg.num_stages,
                                     variant=f"M{M}-int{bits}-factored-xvec{int(xvec)}")
                    assert r.stack_bytes == 0, r
            if not gemv:
                mma = "wgmma.mma_async" if cfg.block_m >= 64 else "mma.sync"
                assert r.instructions[mma] > 0 and r.instructions["cp.async"] > 0, r
            if not gemv and M <= 64:  # scales applied to each K step's product (factored;
                # a decode-batch launch: at 128 x 128 x 8 warps it spills 40 bytes, Triton 3.9)
                r = compile_sm90(kernel, values, dict(meta, FACTORED=True), cfg.num_warps,
                                 cfg.num_stages, variant=f"M{M}-int{bits}-factored")
                assert r.stack_bytes <= 8 and r.instructions[mma] > 0, r
            if not gemv and bits == 4:  # the even/odd-k products (IntGemmConfig.nibble_dots)
                r = compile_sm90(kernel, values, dict(meta, NIBBLE_DOTS=True), cfg.num_warps,
                                 cfg.num_stages, variant=f"M{M}-int4-nibbles")
                assert r.stack_bytes <= 8 and r.instructions[mma] > 0, r
                # values read in place from 32-bit words (IntGemmConfig.words)
                r = compile_sm90(kernel, dict(values, w_ptr="*i32", stride_wn=K // 8),
                                 dict(meta, WORDS=True, EVEN=True), cfg.num_warps,
                                 cfg.num_stages, variant=f"M{M}-int4-words")
                assert r.stack_bytes <= 8 and r.instructions[mma] > 0, r


def test_digits_gemv_compiles_for_hopper() -> None:
    """The dp4a GEMV on x's digit planes (kiln.kernels.int_gemv_digits) at the 8B shape,
    4 chunks x 64 rows a step, whole steps (EVEN, as the 8B launches are): no stack on
    sm_90, 0.75 dp4a (IDP) a weight in the K loop. Measured, SASS instructions a weight:
    Triton 3.6 3.08 for int4 (the float GEMV: 5.9) and 3.53 for int8 (5.4); Triton 3.9
    2.41 and 3.59; with masks (not EVEN) 3.95 and 4.5 under 3.6 (measured before the
    planes' sums were combined in two conversions instead of three)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels import int_gemv_digits
    from kiln.kernels.compile_check import compile_sm90, main_loop_sass

    K = 4096
    for bits in (4, 8):
        group = 128 if bits == 4 else K
        values = {"d_ptr": "*i32", "sx_ptr": "*fp32", "xs_ptr": "*fp32", "w_ptr": "*i32",
                  "s_ptr": "*fp32", "o_ptr": "*fp32", "bias_ptr": "*bf16",
                  "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32", "N": 4096,
                  "K": K, "G": group, "C_PER_SPLIT": 16, "PLANE_W": K // 4,
                  "stride_wn": K * bits // 32, "stride_sn": K // group}
        meta = dict(BITS=bits, BLOCK_N=64, BLOCK_C=4, HAS_OFFSET=bits == 4, HAS_BIAS=True,
                    SPLIT_K=8, INTERPRET=False, EVEN=True)
        r = compile_sm90(int_gemv_digits._digits_gemv_kernel, values, meta, 4, 3,
                         variant=f"digits-int{bits}")
        assert r.stack_bytes == 0, r
        ops = main_loop_sass(int_gemv_digits._digits_gemv_kernel, values, meta, 4, 3)
        weights = 64 * 4 * 4 * (32 // bits) / (32 * 4)  # a thread's, a K step
        # three digit planes: a dp4a a word (int8), two (int4): 0.75 a weight either way
        assert ops["IDP"] == 0.75 * weights, ops
        assert sum(ops.values()) / weights < 4.2, ops  # the float GEMV: 5.9 (int4), 5.4


def test_digits_tiles_compile_for_hopper() -> None:
    """int8 tl.dot tiles on x's digit planes (kiln.kernels.int_gemm_digits) at the 8B shape:
    integer MMAs (mma.sync / wgmma on s8), at most 8 bytes of stack, and at 16 rows fewer
    SASS instructions a weight in the K loop than the float tiles of the same shape.
    Measured with Triton 3.6, 16 x 32 x 128 (the float tiles in brackets): int4 8.2
    (12.4), int8 per channel 2.9 (10.3); 64 x 64 x 128: int4 14.3 (10.1: the three int32
    products are converted and scaled every K step), int8 3.4 (9.7)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels import int_gemm, int_gemm_digits
    from kiln.kernels.compile_check import compile_sm90, main_loop_sass

    N = K = 4096
    for bits in (4, 8):
        group = 128 if bits == 4 else K
        wt = "*u8" if bits == 4 else "*i8"
        common = {"w_ptr": wt, "s_ptr": "*fp32", "o_ptr": "*fp32", "bias_ptr": "*bf16",
                  "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32", "M": 7,
                  "N": N, "K": K, "G": group, "stride_wn": K * bits // 8,
                  "stride_sn": K // group, "stride_om": N}
        for bm, bn in ((16, 32), (64, 64)):
            meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, BITS=bits,
                        HAS_OFFSET=bits == 4, HAS_BIAS=True, SPLIT_K=2, INTERPRET=False)
            values = dict(common, d_ptr="*i8", sx_ptr="*fp32", xs_ptr="*fp32", PLANE=7 * K)
            digits_meta = dict(meta, ONE_GROUP=bits == 8)
            r = compile_sm90(int_gemm_digits._digits_tile_kernel, values, digits_meta, 4, 3,
                             variant=f"digits-M{bm}-int{bits}")
            mma = "wgmma.mma_async" if bm >= 64 else "mma.sync"
            assert r.stack_bytes <= 8 and r.instructions[mma] > 0, r
            if bm == 16:
                ops = main_loop_sass(int_gemm_digits._digits_tile_kernel, values,
                                     digits_meta, 4, 3)
                float_ops = main_loop_sass(
                    int_gemm._gemm_kernel, dict(common, x_ptr="*bf16", stride_xm=K),
                    dict(meta, GROUP_TILE=True, IEEE=False, FACTORED=bits == 8), 4, 3)
                assert sum(ops.values()) < 0.8 * sum(float_ops.values()), (ops, float_ops)
    # int8 per channel: kiln's default digit-tile launches from 17 rows and at gate_up
    for M, N in ((16, 28672), (32, 4096), (32, 6144), (64, 4096), (64, 6144)):
        cfg = int_gemm.int_gemm_config(M, N, K, torch.device("cuda"), 8)
        assert cfg.digits, cfg
        r = compile_sm90(int_gemm_digits._digits_tile_kernel,
                         dict(common, N=N, stride_om=N, d_ptr="*i8", sx_ptr="*fp32",
                              xs_ptr="*fp32", PLANE=7 * K),
                         dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                              GROUP_M=8, BITS=8, HAS_OFFSET=False, HAS_BIAS=True,
                              SPLIT_K=cfg.split_k, INTERPRET=False, ONE_GROUP=True),
                         cfg.num_warps, cfg.num_stages, variant=f"digits-default-M{M}-N{N}")
        mma = "wgmma.mma_async" if cfg.block_m >= 64 else "mma.sync"
        assert r.stack_bytes == 0 and r.instructions[mma] > 0, r


def test_swap_tiles_compile_for_hopper() -> None:
    """Decode-batch tiles computed transposed (IntGemmConfig.swap: out^T = w x^T) at the
    8B's gate_up: the dequantized int4 weight tile is wgmma's register operand (no trip
    through shared memory), so 16-row tiles use wgmma too, with fewer SASS instructions a
    weight in the K loop than kiln's float tiles. Measured with Triton 3.6: 16 x 128 x 128
    6.5 (16 x 32 x 128 mma.sync tiles: 12.4), 64 x 128 x 128 6.9 (64 x 64: 10.1)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels import int_gemm
    from kiln.kernels.compile_check import compile_sm90, main_loop_sass

    N, K = 28672, 4096
    values = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*fp32", "o_ptr": "*fp32",
              "bias_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32",
              "M": 7, "N": N, "K": K, "G": 128, "stride_xm": K, "stride_wn": K // 2,
              "stride_sn": K // 128, "stride_om": N}

    def per_weight(bm: int, bn: int, swap: bool) -> float:
        meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, BITS=4, HAS_OFFSET=True,
                    HAS_BIAS=False, GROUP_TILE=True, SPLIT_K=2, INTERPRET=False, IEEE=False,
                    SWAP=swap)
        r = compile_sm90(int_gemm._gemm_kernel, values, meta, 4, 3,
                         variant=f"M{bm}-N{bn}-swap{int(swap)}")
        assert r.stack_bytes == 0 and r.instructions["wgmma.mma_async"] > 0 or not swap, r
        ops = main_loop_sass(int_gemm._gemm_kernel, values, meta, 4, 3)
        return sum(ops.values()) / (bn * 128 / 128)  # a thread's weights a K step

    for bm, plain_bn in ((16, 32), (64, 64)):
        assert per_weight(bm, 128, True) < 0.8 * per_weight(bm, plain_bn, False)


def test_pipelined_gemvs_compile_for_hopper() -> None:
    """The one-row GEMVs' K loops software-pipelined (IntGemmConfig.pipeline,
    KILN_INT_PIPELINE=1): with LOOP_STAGES 3 the weight words go through cp.async (Triton
    pipelines loads on its own only where they feed tl.dot), without it none do; no stack
    either way. The float GEMV at kiln's int4 and int8 launches, the SmoothQuant dp4a one
    and the digit-plane one."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels import int8_gemv, int_gemm, int_gemv_digits
    from kiln.kernels.compile_check import compile_sm90

    K = N = 4096
    kernels = []
    for bits in (4, 8):
        cfg = int_gemm.int_gemm_config(1, N, K, torch.device("cuda"), bits)
        per = 32 // bits
        kernels.append((int_gemm._gemv1_kernel, {
            "x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "o_ptr": "*fp32",
            "bias_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32",
            "N": N, "K": K, "G": 128, "stride_wn": K // per, "stride_sn": K // 128,
            "W_PER_SPLIT": int_gemm.split_length(K, cfg.split_k, cfg.block_k) // per},
            dict(BITS=bits, HAS_OFFSET=bits == 4, HAS_BIAS=True, BLOCK_N=cfg.block_n,
                 BLOCK_K=cfg.block_k, ATOMIC=False, SPLIT_K=cfg.split_k, GROUPS=1,
                 FACTORED=True, XVEC=True), cfg.num_warps))
        kernels.append((int_gemv_digits._digits_gemv_kernel, {
            "d_ptr": "*i32", "sx_ptr": "*fp32", "xs_ptr": "*fp32", "w_ptr": "*i32",
            "s_ptr": "*fp32", "o_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16",
            "part_ptr": "*fp32", "count_ptr": "*i32", "N": N, "K": K, "G": 128,
            "C_PER_SPLIT": 16, "PLANE_W": K // 4, "stride_wn": K * bits // 32,
            "stride_sn": K // 128},
            dict(BITS=bits, BLOCK_N=64, BLOCK_C=4, HAS_OFFSET=bits == 4, HAS_BIAS=True,
                 SPLIT_K=8, INTERPRET=False, EVEN=True), 4))
    kernels.append((int8_gemv._int8_gemv_kernel, {
        "x_ptr": "*i32", "w_ptr": "*i32", "out_ptr": "*i32", "M": 3, "N": N, "W": K // 4,
        "W_PER_SPLIT": 64, "stride_xm": K // 4, "stride_wn": K // 4, "stride_om": N},
        dict(ROWS=1, BLOCK_N=64, BLOCK_W=32, ATOMIC=True, INTERPRET=False), 4))
    for kernel, values, meta, warps in kernels:
        for stages in (1, 3):
            r = compile_sm90(kernel, values, dict(meta, LOOP_STAGES=stages), warps, 3,
                             variant=f"loop-stages{stages}")
            assert r.stack_bytes == 0 and (r.instructions["cp.async"] > 0) == (stages > 1), r


def test_gemv_rows_compiles_for_hopper() -> None:
    """The few-rows factored GEMV at 2 and 4 rows, 8B shape, in the tiles the int-batch
    sweep launches: no stack on sm_90 (Triton 3.6 and 3.9: 64 x 128 int4 at 4 warps takes
    255 registers at 4 rows, so the sweep also has 8 warps; int8 32 x 256 x 4 warps spills,
    so it is launched with 8)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels import int_gemv_rows
    from kiln.kernels.compile_check import compile_sm90

    K = N = 4096
    for bits, block_n, block_k, warps in ((4, 64, 128, 8), (4, 32, 128, 4), (8, 16, 256, 4),
                                          (8, 32, 256, 8)):
        per = 32 // bits
        for rows in (2, 4):
            r = compile_sm90(int_gemv_rows._gemv_rows_kernel, {
                "x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "o_ptr": "*fp32",
                "bias_ptr": "*bf16", "out_ptr": "*fp32", "M": 3, "N": N, "K": K, "G": 128,
                "W_PER_SPLIT": K // 8 // per, "stride_xm": K, "stride_wn": K // per,
                "stride_sn": K // 128, "stride_om": N,
            }, dict(ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, BITS=bits,
                    HAS_OFFSET=bits == 4, HAS_BIAS=True, GROUPS=max(1, block_k // 128),
                    ATOMIC=True, EVEN_K=True), warps, 3, variant=f"rows{rows}-int{bits}")
            assert r.stack_bytes == 0, r


def test_main_loop_instructions_are_counted() -> None:
    """benchmarks/int_gemv_sass.py's measure: the one-row GEMV's K loop in SASS, found and
    counted per opcode (int4: FFMAs for scale-and-offset and for the product)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from benchmarks.int_gemv_sass import per_weight

    row = per_weight(4, 32, 256)
    assert row["top"].get("FFMA", 0) >= 1 and 3 < row["per_weight"] < 20, row
    assert row["loop"] == round(row["per_weight"] * 64) or row["loop"] > 0
    # the factored K step: one logic op a value, the scale once a word (Triton 3.6: 5.9
    # vs 7.7 instructions a weight at 64 x 128, 3.9: 6.2 vs 7.7)
    for bits in (4, 8):
        plain, factored = (per_weight(bits, 64, 128, FACTORED=f) for f in (False, True))
        assert factored["per_weight"] < 0.9 * plain["per_weight"], (plain, factored)
        assert factored["top"]["LOP3"] < 1.2, factored
    # int4 in bfloat16 pairs (64 x 128: Triton 3.6 4.1 a weight against 5.5 factored, 3.9
    # 4.2 against 4.6; a word unpacked once for every row: 2.45 a weight and row at 4 rows)
    from benchmarks.int_gemv_sass import pairs_per_weight

    factored = per_weight(4, 64, 128, FACTORED=True, XVEC=True)
    one, four = (pairs_per_weight(rows, 64, 128) for rows in (1, 4))
    assert one["per_weight"] < 0.95 * factored["per_weight"], (one, factored)
    assert one["top"]["HFMA2"] >= 0.9 and four["per_weight"] < 0.75 * one["per_weight"], \
        (one, four)


def test_grouped_launches_compile_for_hopper() -> None:
    """A kept GGUF file's layouts (int8 g32: Q8_0; int4 g32 with offsets: Q4_0 / Q4_1; int8
    g16 with offsets: K-quant mixes) in kiln's launches at the 8B's gate-up compile for
    sm_90 without spills: the decode-batch tiles with K steps of several groups (GROUPS,
    48th session) on tensor cores, and the one-row int8 g16 GEMV."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: kernels are not compiled")
    from kiln.kernels import int_gemm
    from kiln.kernels.compile_check import compile_sm90

    N, K = 28672, 4096
    for bits, group, offsets in ((8, 32, False), (4, 32, True), (8, 16, True)):
        for M in (1, 8, 64):
            cfg = int_gemm.int_gemm_config(M, N, K, torch.device("cuda"), bits, group,
                                           pairs_ok=False)
            if M == 1 and cfg.pairs:
                continue  # the int4 pairs GEMV: test_int4_glu's compile check
            values = {"x_ptr": "*bf16", "w_ptr": "*u8" if bits == 4 else "*i8",
                      "s_ptr": "*fp32", "o_ptr": "*fp32", "bias_ptr": "*bf16",
                      "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32", "M": 7,
                      "N": N, "K": K, "G": group, "stride_xm": K,
                      "stride_wn": K * bits // 8, "stride_sn": K // group, "stride_om": N}
            meta = dict(BITS=bits, HAS_OFFSET=offsets, HAS_BIAS=False, BLOCK_N=cfg.block_n,
                        BLOCK_K=cfg.block_k)
            if M == 1:
                for key in ("M", "stride_xm", "stride_om"):
                    values.pop(key)
                values.update(w_ptr="*i32", stride_wn=K * bits // 32,
                              W_PER_SPLIT=int_gemm.split_length(K, cfg.split_k, cfg.block_k)
                              // (32 // bits))
                meta.update(GROUPS=cfg.block_k // group, ATOMIC=False, SPLIT_K=cfg.split_k,
                            FACTORED=cfg.factored, XVEC=cfg.xvec,
                            LOOP_STAGES=cfg.num_stages if cfg.pipeline else 1)
                kernel = int_gemm._gemv1_kernel
            else:
                assert int_gemm.step_groups(group, cfg.block_k) > 1, cfg
                meta.update(BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m, IEEE=False,
                            GROUP_TILE=False, SPLIT_K=cfg.split_k,
                            GROUPS=int_gemm.step_groups(group, cfg.block_k))
                kernel = int_gemm._gemm_kernel
            r = compile_sm90(kernel, values, meta, cfg.num_warps, cfg.num_stages,
                             variant=f"M{M}-int{bits}-g{group}")
            assert r.stack_bytes == 0, r
            if M > 1:
                mma = "wgmma.mma_async" if cfg.block_m >= 64 else "mma.sync"
                assert r.instructions[mma] > 0, r
                # without masks on whole tiles (KILN_INT_EVEN=1)
                r = compile_sm90(kernel, values, dict(meta, EVEN=True), cfg.num_warps,
                                 cfg.num_stages, variant=f"M{M}-int{bits}-g{group}-even")
                assert r.stack_bytes == 0 and r.instructions[mma] > 0, r
