"""The small kernels of a big decode step, by launch: where a 128 / 128 throughput step
(~500 rows) spends the time between its GEMMs and attention.

    python benchmarks/small_kernels_bench.py [out.json] [--ms 256,496,1024]

Times from CUDA-graph replays of many calls over enough input copies (>= 128 MB) that no
call finds its input in the 50 MB L2, what a decode step sees (fp8_gemm.time_calls), at
Llama-3.1-8B shapes, each variant checked bit for bit against kiln's launch:
- act_mul_quant (FP8 engines' SiLU*mul + e4m3 quantization, [M, 2 x 14336] bf16 in):
  the row in one tile at 8 / 16 / 32 warps, or in 4096 / 8192 slices (two passes).
- add_rms_norm + e4m3 quantization and plain add_rms_norm ([M, 4096]): rows a program,
  warps a program.
- the LM head's float32 logits ([M, 4096] x [128256, 4096]): F.linear then .float()
  (kiln's compute_logits), or one GEMM with a float32 output (torch.mm out_dtype), and
  the greedy argmax over either (torch's, kiln's chunked greedy_tokens).
GB/s counts the bytes each kernel must move once.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from fp8_gemm import time_calls  # benchmarks/ is on the path when run as a script

from kiln.kernels import rms_norm as rn
from kiln.kernels.reference_quant import FP8Quant
from kiln.kernels.sampling import greedy_tokens
from kiln.kernels.silu_mul import act_mul_quant

H, INTER, VOCAB = 4096, 14336, 128256


def _time(fn, inputs: list[tuple], nbytes: int) -> float:
    """ms a call of fn(*args), args cycling through copies of inputs (fresh in DRAM)."""
    copies = max(2, -(-(128 << 20) // nbytes))
    args = [tuple(a.clone() if torch.is_tensor(a) else a for a in inputs[0])
            for _ in range(copies)]
    return time_calls(fn, args) * 1e3


def act_variants(m: int) -> list[dict]:
    x = torch.randn(m, 2 * INTER, device="cuda", dtype=torch.bfloat16)
    want = act_mul_quant(x, FP8Quant())
    nbytes = x.numel() * 2 + m * INTER + m * 4
    rows = []
    for launch in ({}, {"num_warps": 16}, {"num_warps": 32}, {"block": 8192, "num_warps": 8},
                   {"block": 8192, "num_warps": 16}, {"block": 4096, "num_warps": 4},
                   {"block": 4096, "num_warps": 8}):
        got = act_mul_quant(x, FP8Quant(), launch=launch)
        same = torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8)) and \
            torch.equal(got.scale, want.scale)
        ms = _time(lambda x, launch=launch: act_mul_quant(x, FP8Quant(), launch=launch),
                   [(x,)], nbytes)
        rows.append(dict(kernel="act_mul_quant", M=m, launch=launch or "kiln", us=ms * 1e3,
                         gbps=nbytes / ms / 1e6, same=same))
    return rows


def norm_variants(m: int) -> list[dict]:
    x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(m, H, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(H, device="cuda", dtype=torch.bfloat16) + 0.5
    rows = []
    for quant, out_bytes in ((FP8Quant(), m * H + m * 4), (None, m * H * 2)):
        want, want_r = rn._launch(x, r, w, 1e-5, quant)
        nbytes = 3 * m * H * 2 + out_bytes  # x, r in; r out; y out
        for launch in ({}, {"num_warps": 4}, {"num_warps": 16}, {"block_r": 2, "num_warps": 8},
                       {"block_r": 2, "num_warps": 16}, {"block_r": 4, "num_warps": 16}):
            got, got_r = rn._launch(x, r, w, 1e-5, quant, launch=launch)
            if quant is None:
                same = torch.equal(got, want)
            else:
                same = torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8)) and \
                    torch.equal(got.scale, want.scale)
            same = same and torch.equal(got_r, want_r)
            ms = _time(lambda x, r, launch=launch, quant=quant: rn._launch(
                x, r, w, 1e-5, quant, launch=launch), [(x, r)], nbytes)
            rows.append(dict(kernel="add_rms_norm" + ("+e4m3" if quant else ""), M=m,
                             launch=launch or "kiln", us=ms * 1e3, gbps=nbytes / ms / 1e6,
                             same=same))
    return rows


def logits_variants(m: int, w: torch.Tensor) -> list[dict]:
    h = torch.randn(m, H, device="cuda", dtype=torch.bfloat16)
    want = F.linear(h, w).float()
    rows = []
    variants = {
        "F.linear + .float()": lambda: F.linear(h, w).float(),
        "F.linear (bf16 out)": lambda: F.linear(h, w),
        "mm out_dtype=float32": lambda: torch.mm(h, w.t(), out_dtype=torch.float32),
        "argmax float32": lambda: want.argmax(-1),
        "argmax bf16": lambda: F.linear(h, w).argmax(-1),
        "greedy_tokens float32": lambda: greedy_tokens(want),  # kiln's chunked argmax
    }
    for name, fn in variants.items():
        try:
            got = fn()
        except (RuntimeError, TypeError) as e:
            rows.append(dict(kernel="logits", M=m, launch=name, error=str(e)[:120]))
            continue
        same = None
        if name.startswith("greedy"):
            same = float((got != want.argmax(-1)).sum())  # rows that differ from torch
        elif got.dtype == torch.float32:
            same = float((got - want).abs().max())
        ms = _time(lambda fn=fn: fn(), [()], w.numel() * 2)  # the weight dominates
        rows.append(dict(kernel="logits", M=m, launch=name, us=ms * 1e3, max_diff=same))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="small_kernels.json")
    ap.add_argument("--ms", default="256,496,1024")
    args = ap.parse_args()
    ms = [int(m) for m in args.ms.split(",")]
    w = torch.randn(VOCAB, H, device="cuda", dtype=torch.bfloat16) * 0.02
    rows = []
    for m in ms:
        for row in act_variants(m) + norm_variants(m) + logits_variants(m, w):
            rows.append(row)
            extra = f"{row['gbps']:7.0f} GB/s  same={row['same']}" if "gbps" in row else \
                f"max_diff={row.get('max_diff')}" if "us" in row else row.get("error", "")
            us = f"{row['us']:8.1f} us" if "us" in row else "       -   "
            print(f"{row['kernel']:18s} M={m:5d} {str(row['launch']):36s} {us} {extra}",
                  flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
