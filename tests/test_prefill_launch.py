"""The prefill attention kernel's launch options that benchmarks/attn_prefill_sweep.py
varies (tile order, warps, stages) leave its result as the reference's (interpreter)."""

from __future__ import annotations

import pytest
import torch

from tests.test_kernels import check_prefill, interp  # noqa: F401


@pytest.mark.parametrize("heavy_first", [False, True])
@pytest.mark.parametrize("block_m,block_n,num_stages,num_warps",
                         [(16, 16, 1, 4), (32, 64, 3, 8)])
def test_prefill_launch_options(interp, heavy_first, block_m, block_n, num_stages,  # noqa: F811
                                num_warps) -> None:
    interp(check_prefill, torch.float32, 1e-4, 1e-4, 4, 2, 32, block_m, block_n,
           heavy_first=heavy_first, num_stages=num_stages, num_warps=num_warps)


def test_prefill_heavy_first_with_window(interp) -> None:  # noqa: F811
    interp(check_prefill, torch.float32, 1e-4, 1e-4, 4, 2, 32, 16, 16, window=9,
           softcap=30.0, heavy_first=True)
