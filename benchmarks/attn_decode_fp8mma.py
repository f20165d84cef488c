"""Decode attention over an e4m3 KV cache with e4m3 products against kiln's converting
kernel: correctness on the CPU (interpreter) or a GPU, offline sm_90 compiles, GPU timings.

The kernel is kiln.kernels.attention_decode_fp8mma (opt-in: KILN_DECODE_FP8_MMA=1): keys
as the MMA's M, K and V^T tiles straight into e4m3 products, q and p rounded to e4m3
(split: each as a value and its rounding error, two products). kiln's kernel converts
each e4m3 byte to float16 first; on the transposed V layout it reads B=512 x 1536 at
~4.0 TB/s but 128 / 128 serving's short contexts (~500 sequences x 128-256 keys) at ~2.8.
`check` compares the kernel with float32 attention over the dequantized cache and with
its own rounding emulated in torch (62nd session, CPU: relative to max |ref|, 4.6e-3 with
split, as kiln's kernel's 4.1-4.7e-3; 4-13% without; 1e-2 or better against the
emulation). Offline sm_90 (`compile`): an e4m3 wgmma for each product (SASS QGMMA), main
loop 21.6 warp instructions a key at 128-key tiles / 4 warps with split (14.5 without),
kiln's transposed launch 19.6 (a third of them conversions).

    PYTHONPATH=$PWD python benchmarks/attn_decode_fp8mma.py check      (CPU: interpreter)
    PYTHONPATH=$PWD python benchmarks/attn_decode_fp8mma.py compile    (no GPU: sm_90)
    PYTHONPATH=$PWD python benchmarks/attn_decode_fp8mma.py bench OUT.json   (GPU)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from functools import partial

import torch

if __name__ == "__main__" and sys.argv[1:2] == ["check"] and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported
    from tests.test_kernels import _init_worker

    _init_worker()

from kiln.kernels.attention_decode_fp8mma import (  # noqa: E402
    LO_SCALE,
    P_SCALE,
    _fp8mma_decode_kernel,
)
from kiln.kernels.attention_decode_fp8mma import fp8mma_decode as _kiln_fp8mma  # noqa: E402

HEADS, KV_HEADS, D, BS = 32, 8, 128, 16
BENCH_SHAPES = [(512, 1536), (496, 256), (496, 160), (256, 1024), (64, 8192)]
# (BLOCK_N, num_warps, num_stages); splits: q and p in one e4m3 each (0) / two each (2)
SWEEP = list(itertools.product((64, 128), (4, 8), (2, 3)))
SPLITS = (0, 2)


def fp8mma_decode(q, k_cache, v_t_cache, block_tables, seq_lens, scale, k_scale, v_scale,
                  block_n: int = 128, num_warps: int = 4, num_stages: int = 2,
                  split: int = 2, num_splits: int = 1) -> torch.Tensor:
    """kiln's kernel (kiln.kernels.attention_decode_fp8mma) at a given launch."""
    return _kiln_fp8mma(q, k_cache, v_t_cache, block_tables, seq_lens, scale, k_scale,
                        v_scale, torch.empty_like(q), num_splits, split=bool(split),
                        launch=(block_n, num_warps, num_stages))


def make_inputs(lens: list[int], device: str, seed: int = 0):
    """q (bf16), e4m3 K, V and V transposed (a zeroed pool, as the engine's), tables (a
    random permutation of the pool), lens, per-KV-head scales."""
    g = torch.Generator(device=device).manual_seed(seed)
    blocks_per = max(-(-max(lens) // BS), 1)
    pool = len(lens) * blocks_per + 1
    k, v = (torch.randn(pool, BS, KV_HEADS, D, generator=g, device=device) for _ in "kv")
    k[..., 3, :] *= 4.0  # heads of different ranges: distinct scales
    q = torch.randn(len(lens), HEADS, D, generator=g, device=device).to(torch.bfloat16)
    tables = torch.randperm(pool, generator=g, device=device)[: len(lens) * blocks_per]
    tables = tables.view(len(lens), blocks_per).to(torch.int32)
    scales = {}
    for name, x in (("k", k), ("v", v)):
        s = (x.abs().amax(dim=(0, 1, 3)) / 448.0).clamp_min(1e-8).float()
        scales[name] = s
    k8 = (k / scales["k"][None, None, :, None]).to(torch.float8_e4m3fn)
    v8 = (v / scales["v"][None, None, :, None]).to(torch.float8_e4m3fn)
    del k, v
    v8_t = v8.permute(0, 2, 3, 1).contiguous()
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k8, v8, v8_t, tables, seq_lens, scales["k"], scales["v"]


def _round_e4m3(x: torch.Tensor, dims: tuple[int, ...] | None) -> torch.Tensor:
    """x through e4m3 with one scale over dims (None: no scale; values in range)."""
    if dims is None:
        return x.to(torch.float8_e4m3fn).float()
    s = (x.abs().amax(dims, keepdim=True) / 448.0).clamp_min(1e-30)
    return (x / s).to(torch.float8_e4m3fn).float() * s


def reference(q, k8, v8, tables, seq_lens, scale, k_scale, v_scale,
              as_kernel: int | None = None) -> torch.Tensor:
    """float32 attention over the dequantized cache, q as given; as_kernel (the kernel's
    split, 0 or 2): q and p rounded to e4m3 as the kernel rounds them (one q scale a KV
    head's query heads; 2: each one's rounding error, times LO_SCALE, rounded too)."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    group = q.shape[1] // k8.shape[2]
    for i, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        blocks, slots = tables[i, pos // BS].long(), pos % BS
        k = k8[blocks, slots].float() * k_scale[None, :, None]
        v = v8[blocks, slots].float() * v_scale[None, :, None]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        qi = q[i].float()
        if as_kernel is not None:
            qg = qi.view(-1, group, qi.shape[-1])
            qs = (qg.abs().amax((1, 2), keepdim=True) / 448.0).clamp_min(1e-30)
            hi = _round_e4m3(qg / qs, None)
            lo = _round_e4m3((qg / qs - hi) * LO_SCALE, None) / LO_SCALE if as_kernel else 0
            qi = ((hi + lo) * qs).view_as(qi)
        s = torch.einsum("hd,nhd->hn", qi, k) * scale
        p = (s - s.amax(-1, keepdim=True)).exp()
        l_sum = p.sum(-1, keepdim=True)
        if as_kernel is not None:
            hi = _round_e4m3(p * P_SCALE, None)
            lo = _round_e4m3((p * P_SCALE - hi) * LO_SCALE, None) / LO_SCALE if as_kernel \
                else 0
            p = (hi + lo) / P_SCALE
        out[i] = torch.einsum("hn,nhd->hd", p / l_sum, v)
    return out


def check() -> None:
    from kiln.kernels.attention_decode import paged_attention_decode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    scale = D ** -0.5
    configs = [(64, 4, 2, sp) for sp in SPLITS] + [(128, 4, 2, 2)] if device == "cpu" \
        else [(*c, sp) for c in SWEEP for sp in SPLITS]
    worst = 0.0
    for lens in ([1, 70, 200], [64, 128, 0, 33], [300, 17]):
        q, k8, v8, v8_t, tables, seq_lens, ks, vs = make_inputs(lens, device)
        ref = reference(q, k8, v8, tables, seq_lens, scale, ks, vs)
        emus = {sp: reference(q, k8, v8, tables, seq_lens, scale, ks, vs, as_kernel=sp)
                for sp in SPLITS}
        size = ref.abs().amax().item()
        kiln = paged_attention_decode(q, k8, v8, tables, seq_lens, scale, num_splits=1,
                                      k_scale=ks, v_scale=vs).float()
        d_kiln = (kiln - ref).abs().max().item() / size
        for block_n, warps, stages, split in configs:
            out = fp8mma_decode(q, k8, v8_t, tables, seq_lens, scale, ks, vs, block_n,
                                warps, stages, split).float()
            emu = emus[split]
            empty_ok = bool((out[seq_lens == 0] == 0).all())
            err = (out - ref).abs().max().item() / size
            rms = ((out - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
            d_emu = (out - emu).abs().max().item() / size
            worst = max(worst, d_emu)
            print(f"lens={lens} BLOCK_N={block_n} warps={warps} stages={stages} "
                  f"split={split}: "
                  f"max|fp8mma - ref| / max|ref| {err:.2e} (rms {rms:.2e}); kiln's "
                  f"{d_kiln:.2e}; against its rounding emulated {d_emu:.2e}; empty rows "
                  f"zero: {empty_ok}")
            assert empty_ok
    print(f"worst error against the emulation {worst:.2e}")


def bench(path: str) -> None:
    from triton.testing import do_bench

    from kiln.kernels.attention_decode import paged_attention_decode

    scale = D ** -0.5
    rows = []
    print(f"{'shape':16} {'impl':7} {'config':28} {'ms':>8} {'TB/s':>6} {'err':>8}")
    for batch, ctx in BENCH_SHAPES:
        q, k8, v8, v8_t, tables, seq_lens, ks, vs = make_inputs([ctx] * batch, "cuda")
        nbytes = 2 * batch * ctx * KV_HEADS * D
        ref = paged_attention_decode(q, k8, v8, tables, seq_lens, scale, num_splits=1,
                                     k_scale=ks, v_scale=vs).float()
        size = ref.abs().amax().item()
        runs = [("kiln", {"splits": s, "layout": lay}, partial(
            paged_attention_decode, q, k8, v, tables, seq_lens, scale, num_splits=s,
            k_scale=ks, v_scale=vs)) for s in (1, None) for lay, v in (("v_t", v8_t),
                                                                       ("usual", v8))]
        runs += [("fp8mma", {"block_n": n, "warps": w, "stages": st, "split": sp}, partial(
            fp8mma_decode, q, k8, v8_t, tables, seq_lens, scale, ks, vs, n, w, st, sp))
            for n, w, st in SWEEP for sp in SPLITS]
        for impl, cfg, fn in runs:
            try:
                err = (fn().float() - ref).abs().max().item() / size
                ms = do_bench(fn, warmup=5, rep=40, return_mode="median")
            except Exception as e:  # noqa: BLE001 -- out of shared memory, compile errors
                print(f"  {impl} {cfg}: skipped ({type(e).__name__}: {str(e)[:80]})")
                continue
            rows.append(dict(batch=batch, ctx=ctx, impl=impl, **cfg, ms=ms,
                             tbps=nbytes / ms / 1e9, rel_err=err))
            text = " ".join(f"{k}={v}" for k, v in cfg.items())
            print(f"B={batch:4} ctx={ctx:5} {impl:7} {text:28} {ms:8.4f} "
                  f"{nbytes / ms / 1e9:6.2f} {err:8.1e}", flush=True)
        del q, k8, v8, v8_t, ref
        torch.cuda.empty_cache()
    print("\nbest per shape (against kiln's default launch on the transposed layout):")
    for batch, ctx in BENCH_SHAPES:
        sel = [r for r in rows if (r["batch"], r["ctx"]) == (batch, ctx)]
        base = [r["ms"] for r in sel if r["impl"] == "kiln" and r.get("splits") is None
                and r.get("layout") == "v_t"]
        for impl, split in (("kiln", None), *(("fp8mma", sp) for sp in SPLITS)):
            mine = [r for r in sel if r["impl"] == impl and r.get("split") == split]
            if mine and base:
                b = min(mine, key=lambda r: r["ms"])
                print(f"B={batch:4} ctx={ctx:5} {impl:7} {b['ms']:.4f} ms {b['tbps']:.2f} "
                      f"TB/s ({base[0] / b['ms']:.2f}x kiln) {b}")
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


def compile_report() -> None:
    """Offline sm_90 compiles: registers, spills, e4m3 wgmma, main-loop instructions."""
    import re

    from kiln.kernels import compile_check as cc

    values = {"q_ptr": "*bf16", "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv",
              "out_ptr": "*bf16", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
              "qk_scale": 0.1, "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32",
              "stride_qt": 4096, "stride_qh": 128, "stride_ot": 4096, "stride_oh": 128,
              "stride_kb": 16384, "stride_ks": 1024, "stride_kh": 128, "stride_bt": 511}
    for (block_n, warps, stages), split in itertools.product(SWEEP, SPLITS):
        const = {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_G": 16,
                 "BLOCK_N": block_n, "NUM_SPLITS": 1, "SPLIT": bool(split)}
        try:
            kernel = cc._compile(_fp8mma_decode_kernel, values, const, warps, stages)
        except Exception as e:  # noqa: BLE001
            print(f"N={block_n} warps={warps} stages={stages} split={split}: "
                  f"{type(e).__name__}: {str(e)[:300]}")
            continue
        usage = cc._cuobjdump(kernel, "--dump-resource-usage")
        regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
        sass = cc._cuobjdump(kernel, "-sass")
        loop = sum(cc.main_loop_sass(_fp8mma_decode_kernel, values, const, warps,
                                     stages).values())
        print(f"N={block_n:3} warps={warps} stages={stages} split={split}: regs {regs[1]} "
              f"stack {regs[2]} smem {kernel.metadata.shared} QGMMA (e4m3 wgmma) "
              f"{len(re.findall('QGMMA', sass))} HMMA {len(re.findall('HMMA', sass))}; "
              f"main loop {loop * warps / block_n:.1f} warp instructions a key")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check")
    sub.add_parser("compile")
    b = sub.add_parser("bench")
    b.add_argument("out")
    args = parser.parse_args()
    {"check": check, "compile": compile_report}.get(args.cmd, lambda: bench(args.out))()


if __name__ == "__main__":
    main()
