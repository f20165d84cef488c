"""One call of a linear layer at a Llama-3.1-8B shape between cudaProfilerStart and
cudaProfilerStop, for Nsight Compute (`ncu --profile-from-start off`): the weight comes
from HBM (L2 flushed before the call), kernels are compiled and warm. What bounds a
kernel (instruction issue, memory latency, occupancy) is read from ncu's warp-state and
scheduler sections; `gpu_suite.sh ncu-int` runs this under ncu for kiln's integer
kernels and bf16 cuBLAS and prints the lines that decide it (docs/profiling.md).

    ncu --clock-control none --profile-from-start off --section WarpStateStats \\
        python benchmarks/ncu_linear.py int4 1 gate_up
    KILN_INT_TILES=64,128,4,3,2,0,0,0,0,1,1 ncu ... python benchmarks/ncu_linear.py int4 64

Arguments: bf16 | int4 | int8 (int4 in groups of 128 with offsets, int8 per channel), the
rows, and the shape (qkv, o, gate_up, down; default gate_up). kiln's launch overrides
(KILN_INT_GEMV1, KILN_INT_TILES, ...: kiln/kernels/int_launch.py) pick other launches.
"""

from __future__ import annotations

import sys

import torch


def main(argv: list[str]) -> None:
    from int_gemv_bench import SHAPES, int_weight

    from kiln.kernels import int_gemm

    kind, rows = argv[0], int(argv[1])
    shape = argv[2] if len(argv) > 2 else "gate_up"
    if kind not in ("bf16", "int4", "int8") or shape not in SHAPES:
        sys.exit(f"usage: ncu_linear.py bf16|int4|int8 ROWS [{'|'.join(SHAPES)}]")
    N, K = SHAPES[shape]
    x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
    if kind == "bf16":
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        def call():
            return x @ w.T
    else:
        weight, scale, offset, _ = int_weight(N, K, 4 if kind == "int4" else 8)
        def call():
            return int_gemm.int_weight_linear(x, weight, scale, offset)
    for _ in range(3):  # compiled, autotuned, warm
        call()
    flush = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    flush.zero_()  # evicts the weight from the 50 MB L2
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"{kind} {rows} x {shape} ({N} x {K}): profiled one call")


if __name__ == "__main__":
    main(sys.argv[1:])
