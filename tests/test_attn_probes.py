"""The attention probe in benchmarks/ (a prototype kernel timed on a GPU against kiln's):
its arithmetic in the interpreter, so that what a device session times is a kernel that
computes attention (against SDPA)."""

from __future__ import annotations

import os
import sys

from tests.test_kernels import interp  # noqa: F401

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")


def check_prefill_tma() -> None:
    sys.path.insert(0, BENCHMARKS)
    import attn_prefill_tma

    attn_prefill_tma.quick([  # one query head a tile; a KV head's group packed
        dict(block_m=128, block_n=64, num_warps=8, num_stages=2, pack_group=False),
        dict(block_m=128, block_n=64, num_warps=8, num_stages=3, pack_group=True)])


def test_tma_prefill_probe_matches_sdpa(interp) -> None:  # noqa: F811
    interp(check_prefill_tma)
