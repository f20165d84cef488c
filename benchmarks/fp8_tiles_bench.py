"""FP8 W8A8 GEMMs at decode batches of 128-1024 rows (Llama-3.1-8B shapes): what kiln runs
there (torch._scaled_mm with rowwise scales, or fp8_mid's tensorwise call + scale kernel
at 65-256 rows) against the W8A8 GEMM's tiles (kiln/kernels/int8_gemm.py) on e4m3 inputs
with float32 sums (int8_gemm.fp8_scaled_mm, not used by engines). Why: cuBLAS's FP8 GEMMs
are uneven across batch sizes (37th session, a layer's four linears: 186 us at 512 rows,
193 at 296, 231 at 448), while the int8 tiles took 160 at 296 and 193 at 448 without
Triton pipelining integer wgmma, which it does for fp8. Microseconds a call from CUDA-graph
replays over weight copies past L2; every launch is checked against _scaled_mm first
(max |difference| over max |value|; the 37th measured 5e-3 to 1.1e-2, more than one bf16
rounding, with the fp8 MMA's sums never promoted to float32 (Triton's sm_90 default). The
kernel now promotes them every K step, as kiln's other FP8 kernels do, untimed; "exact":
both against float64 products).

    python benchmarks/fp8_tiles_bench.py OUT.json [--rows 128,160,224,296,384,448,512,1024]
"""

from __future__ import annotations

import sys

import torch

from benchmarks.fp8_gemm import time_calls
from benchmarks.int8_gemm_bench import sweep_rows, tile_launches, time_tiles
from benchmarks.int_gemv_bench import SHAPES, n_copies

# (block_m, block_n, block_k, group_m, warps, stages[, split_k])
TILES = [
    (64, 128, 128, 8, 4, 3), (64, 128, 128, 8, 4, 4), (64, 256, 128, 8, 4, 3),
    (64, 128, 256, 8, 4, 3), (128, 128, 128, 8, 4, 3), (128, 128, 128, 8, 8, 3),
    (128, 128, 128, 8, 8, 4), (128, 256, 128, 8, 8, 3), (128, 256, 64, 8, 8, 4),
    (128, 128, 256, 8, 8, 3), (256, 128, 128, 8, 8, 3), (64, 128, 128, 8, 4, 3, 2),
]


def measure(M: int, name: str, dev: str) -> dict:
    from kiln.kernels import fp8, int8_gemm
    from kiln.kernels.reference_quant import FP8Act

    N, K = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(N + K)
    ws = [(torch.randn(N, K, device="cuda", generator=g) * 0.5).to(torch.float8_e4m3fn)
          for _ in range(n_copies(N * K))]
    scales = [torch.rand(N, device="cuda", generator=g) * 0.01 for _ in ws]
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    x_q, x_scale = fp8.quantize_fp8_per_token(x)
    act = FP8Act(x_q, x_scale, torch.bfloat16)

    def scaled(w, s):
        return torch._scaled_mm(x_q, w.t(), scale_a=x_scale, scale_b=s.view(1, N),
                                out_dtype=torch.bfloat16)

    def tiles(w, s, cfg):
        return int8_gemm.fp8_scaled_mm(x_q, x_scale, w, s, None, torch.bfloat16, cfg)

    row = {"rows": M, "shape": name, "N": N, "K": K, "device": dev}
    row["kiln"] = time_calls(lambda w, s: fp8.scaled_mm_fp8_linear(act, w, s),
                             list(zip(ws, scales))) * 1e6
    row["scaled_mm"] = time_calls(scaled, list(zip(ws, scales))) * 1e6
    want = scaled(ws[0], scales[0]).float()
    peak = want.abs().max().item()
    # both against the exact products (float64): Hopper's fp8 wgmma sums in fewer bits than
    # float32 unless promoted (cuBLAS promotes; Triton after max_num_imprecise_acc)
    exact = (x_q.double() @ ws[0].double().t()) * x_scale.double() * scales[0].double()
    row["scaled_mm err"] = (want.double() - exact).abs().max().item() / peak
    launches = {label: cfg for label, cfg in tile_launches(TILES).items()
                if cfg is None or cfg.smem_bytes <= 220 * 1024}

    def check(cfg):
        got = tiles(ws[0], scales[0], cfg)
        label = next(k for k, v in launches.items() if v is cfg)
        err = (got.float() - want).abs().max().item() / peak
        if err > 2e-2:
            return f"MISMATCH {err:.2e}"
        row[f"err {label}"] = err
        row[f"exact err {label}"] = (got.double() - exact).abs().max().item() / peak
        return None

    time_tiles(row, "tiles", launches, check, tiles, list(zip(ws, scales)))
    return row


def describe(M: int, name: str, row: dict) -> str:
    best = row["best"]
    label = best[6:] if best else ""
    return (f"M={M:5d} {name:8s} kiln {row['kiln']:7.1f} us  _scaled_mm "
            f"{row['scaled_mm']:7.1f}  tiles auto {row.get('tiles auto')}  best {best} "
            f"{row[best] if best else float('nan'):.1f} us (against _scaled_mm "
            f"{row.get('err ' + label)}; against exact: it {row.get('exact err ' + label)}, "
            f"_scaled_mm {row['scaled_mm err']:.2e})")


def main() -> None:
    sweep_rows(measure, describe, ("kiln", "scaled_mm"), "tiles", TILES, "fp8_tiles.json",
               "128,160,224,296,384,448,512,1024")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("fp8_tiles_bench.py needs a CUDA GPU")
    main()
