"""SmoothQuant W8A8 GEMMs at decode-batch and prefill rows (Llama-3.1-8B shapes): the fused
Triton GEMM (kiln/kernels/int8_gemm.py, the scaling epilogue in the kernel, opt-in
KILN_INT8_GEMM=triton) over a grid of tiles, against what int8_sq engines run by default
(torch._int_mm, its int32 product written and read back by int8_act's epilogue), _int_mm
alone, bf16 cuBLAS and FP8 _scaled_mm (rowwise) on the same rows. Microseconds a call from
CUDA-graph replays over weight copies past L2 (benchmarks.fp8_gemm.time_calls); each
Triton launch is checked bit for bit against the default path first.

    python benchmarks/int8_gemm_bench.py OUT.json [--rows 4,16,32,64,128,256,512,1024,4096]

Prints a table per row count (TOPS = 2 M N K / time) and writes every timing to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from fp8_gemm import time_calls
from int_gemv_bench import SHAPES, n_copies

# (block_m, block_n, block_k, group_m, warps, stages[, split_k]); kiln's choice (gemm_config) is
# timed as "auto" beside them. Triton 3.6 does not overlap one K step's integer wgmma with
# the next (wait_group 0 each step), so tiles small enough for two or three programs an SM
# (<= ~110 KB of shared memory, <= 128 registers a thread) let one program's products
# run while another waits.
TILES = [
    (64, 128, 128, 8, 4, 3), (64, 128, 128, 8, 4, 4), (64, 256, 128, 8, 4, 3),
    (128, 128, 128, 8, 8, 3), (128, 128, 128, 8, 8, 4), (128, 128, 128, 8, 4, 3),
    (128, 128, 64, 8, 8, 4), (128, 128, 256, 8, 8, 3), (128, 256, 128, 8, 8, 3),
    (128, 256, 64, 8, 8, 4), (256, 128, 128, 8, 8, 3), (128, 128, 128, 1, 8, 3),
    # K split (a seventh field; gemm_config splits where tiles are fewer than two an SM)
    (64, 128, 128, 8, 4, 3, 2), (64, 128, 128, 8, 8, 3, 4), (128, 128, 128, 8, 8, 3, 2),
    (128, 128, 128, 8, 8, 3, 4),
    # 16- and 32-row tiles (mma.sync) for 2-48 rows (at 17-48 kiln keeps _int_mm: a 64-row
    # tile is half empty there; these are the candidates)
    (16, 64, 256, 1, 4, 4), (16, 128, 128, 1, 4, 4), (16, 64, 256, 1, 4, 4, 4),
    (16, 64, 128, 1, 4, 6, 2), (32, 64, 256, 1, 4, 4), (32, 128, 128, 1, 4, 4),
    (32, 64, 256, 1, 4, 4, 2), (32, 128, 128, 4, 4, 4),
]


def measure(M: int, name: str, dev: str) -> dict:
    """One shape at M rows: every path's microseconds a call ("best": the fastest tile)."""
    from kiln.kernels import int8_act, int8_gemm

    N, K = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(N + K)
    ws = [torch.randint(-127, 128, (N, K), device="cuda", generator=g, dtype=torch.int8)
          for _ in range(n_copies(N * K))]
    scales = [torch.rand(N, device="cuda", generator=g) * 0.01 for _ in ws]
    x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
    x_q, x_scale = int8_act.quantize_int8_per_token(x, rows=17)
    w16 = [w.to(torch.bfloat16) for w in ws[:max(1, n_copies(2 * N * K))]]
    w8 = [w.to(torch.float8_e4m3fn) for w in ws]
    xf8, xs, one = x.to(torch.float8_e4m3fn), torch.ones(M, 1, device="cuda"), \
        torch.ones(1, N, device="cuda")

    def default(w, s):
        acc = torch._int_mm(x_q, w.t())
        return int8_act.scale_int8_product(acc, x_scale, s, None, torch.bfloat16)

    def fused(w, s, cfg):
        return int8_gemm.int8_scaled_mm(x_q, x_scale, w, s, None, torch.bfloat16, cfg)

    row = {"rows": M, "shape": name, "N": N, "K": K, "device": dev}
    row["default"] = time_calls(default, list(zip(ws, scales))) * 1e6
    row["int_mm"] = time_calls(lambda w: torch._int_mm(x_q, w.t()), [(w,) for w in ws]) * 1e6
    row["bf16"] = time_calls(lambda w: torch.nn.functional.linear(x, w),
                             [(w,) for w in w16]) * 1e6
    try:  # _scaled_mm wants rows in multiples of 16
        row["fp8"] = time_calls(lambda w: torch._scaled_mm(
            xf8, w.t(), scale_a=xs, scale_b=one, out_dtype=torch.bfloat16),
            [(w,) for w in w8]) * 1e6
    except RuntimeError:
        row["fp8"] = float("nan")
    want = default(ws[0], scales[0])
    # kiln's choice timed last: the first launch timed after cuBLAS's came out 10-15% slower
    # than the same tile timed later (35th session, 128 x 128 tiles at 768-4096 rows)
    launches = {label: cfg for label, cfg in tile_launches(TILES).items() if cfg is None or (
        cfg.smem_bytes <= 220 * 1024 and (cfg.block_m < 64) == (M <= 48)
        and not (cfg.block_m > 16 and M <= 16))}  # 16-row tiles at 2-48 rows, 32 at 17-48

    def check(cfg):
        return None if torch.equal(fused(ws[0], scales[0], cfg), want) else "MISMATCH"

    time_tiles(row, "triton", launches, check, fused, list(zip(ws, scales)))
    return row


def tile_launches(tiles: list) -> dict:
    """{label: Int8GemmConfig} of the tiles swept, kiln's choice ("auto", None) last: the
    first launch timed after cuBLAS's came out 10-15% slower than the same tile timed later
    (35th session, 128 x 128 tiles at 768-4096 rows)."""
    from kiln.kernels import int8_gemm

    return {**{"x".join(map(str, t)): int8_gemm.Int8GemmConfig(*t) for t in tiles},
            "auto": None}


def time_tiles(row: dict, prefix: str, launches: dict, check, run, args: list) -> None:
    """row[f"{prefix} {label}"] = microseconds a call of run(*a, cfg) over args, for each
    launch that check(cfg) passes (None; else what it returns is stored), or the error of
    one that does not fit; row["best"]: the fastest key."""
    for label, cfg in launches.items():
        try:
            bad = check(cfg)
            if bad is not None:
                row[f"{prefix} {label}"] = bad
                continue
            row[f"{prefix} {label}"] = time_calls(run, [(*a, cfg) for a in args]) * 1e6
        except Exception as e:  # a launch that does not fit: say so, go on
            row[f"{prefix} {label}"] = f"{type(e).__name__}: {str(e)[:80]}"
    timed = {k: v for k, v in row.items() if k.startswith(prefix) and isinstance(v, float)}
    row["best"] = min(timed, key=timed.get) if timed else None


def describe(M: int, name: str, row: dict) -> str:
    """One shape's line of the table."""
    best = row["best"]
    t_best = row[best] if best else float("nan")
    tops = 2 * M * row["N"] * row["K"] / 1e12
    return (f"M={M:5d} {name:8s} default {row['default']:8.1f} us  _int_mm "
            f"{row['int_mm']:8.1f}  bf16 {row['bf16']:8.1f}  fp8 {row['fp8']:8.1f}  "
            f"triton auto {row.get('triton auto')}  best {best} {t_best:.1f} us "
            f"({tops / t_best * 1e6:.0f} TOPS; default {tops / row['default'] * 1e6:.0f})")


def sweep_rows(measure, describe, columns: tuple[str, ...], prefix: str, tiles: list,
               out: str, rows: str) -> None:
    """The command line of a GEMM sweep: measure(M, shape,
    device) -> a row per shape at each row count, a line each (describe), then the layer
    (the four shapes summed: `columns`, `prefix` auto and the best tile), all rows written
    to OUT.json after each row count."""
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=out)
    ap.add_argument("--rows", default=rows)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    results = []
    for M in [int(r) for r in args.rows.split(",")]:
        table = []
        for name in args.shapes.split(","):
            row = measure(M, name, dev)
            table.append(row)
            results.append(row)
            print(describe(M, name, row), flush=True)
        layer = {k: sum(r[k] for r in table) for k in columns}
        layer[f"{prefix} auto"] = sum(r[f"{prefix} auto"] for r in table
                                      if isinstance(r.get(f"{prefix} auto"), float))
        layer[f"{prefix} best"] = sum(r[r["best"]] for r in table if r["best"])
        print(f"M={M:5d} layer: " + ", ".join(f"{k} {v:.1f}" for k, v in layer.items()),
              flush=True)
        with open(args.out, "w") as f:
            json.dump({"device": dev, "tiles": tiles, "results": results}, f, indent=1)


def main() -> None:
    sweep_rows(measure, describe, ("default", "int_mm", "bf16", "fp8"), "triton", TILES,
               "int8_gemm.json", "4,16,32,64,128,256,512,1024,4096")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("int8_gemm_bench.py needs a CUDA GPU")
    main()
