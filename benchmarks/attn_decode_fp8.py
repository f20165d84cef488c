"""Decode attention over an e4m3 KV cache: the e4m3 modes side by side, on one GPU.

    python benchmarks/attn_decode_fp8.py [out.json] [--sweep] [--modes old,cvt,qk8,qk8x1]

Llama-3.1-8B decode shapes (32 q heads, 8 KV heads, d 128, 16-token blocks shuffled over
the pool), batch 64 / 256 / 512 x context 1000 / 1536 / 2000 (and 64 x 8192). Each mode
(kiln.kernels.attention_decode.E4M3_MODES) runs in this one process with the launch
config decode_config picks for it; --sweep also times BLOCK_N x stages x warps per mode
and prints the best. TB/s counts the K and V bytes of the contexts once. Error: max |out
- oracle| / max |V| over the first 32 sequences, the oracle being the float32 reference
on the same e4m3 cache (kernel bf16 output included); "old" shows what is accepted now.
"""

from __future__ import annotations

import argparse
import itertools
import json
from functools import partial

import torch
from triton.testing import do_bench

from kiln.kernels import reference as ref
from kiln.kernels.attention_decode import E4M3_MODES, decode_config, paged_attention_decode

HEADS, KV_HEADS, D, BS = 32, 8, 128, 16
SHAPES = [(64, 1000), (64, 2000), (64, 8192), (256, 1000), (256, 1536), (256, 2000),
          (512, 1000), (512, 1536), (512, 2000)]
SWEEP = list(itertools.product((64, 128), (2, 3), (2, 4, 8)))
CHECKED = 32  # sequences compared with the float32 reference


def make(batch: int, ctx: int):
    blocks_per = -(-ctx // BS)
    n = batch * blocks_per + 1
    k = torch.randn(n, BS, KV_HEADS, D, device="cuda")
    v = torch.randn(n, BS, KV_HEADS, D, device="cuda")
    k_scale = (k.abs().amax(dim=(0, 1, 3)) / ref.FP8_MAX).contiguous()
    v_scale = (v.abs().amax(dim=(0, 1, 3)) / ref.FP8_MAX).contiguous()
    k8 = ref.quantize_kv(k.flatten(0, 1), k_scale, torch.float8_e4m3fn).view(k.shape)
    v8 = ref.quantize_kv(v.flatten(0, 1), v_scale, torch.float8_e4m3fn).view(v.shape)
    tables = torch.randperm(n - 1, device="cuda")[: batch * blocks_per].view(batch, blocks_per)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    # queries with a realistic spread of attention: some heads peaked, some flat
    q = torch.randn(batch, HEADS, D, device="cuda") * torch.linspace(0.5, 3.0, HEADS,
                                                                     device="cuda")[:, None]
    return q.bfloat16(), k8, v8, tables.int(), lens, k_scale, v_scale


def error(out: torch.Tensor, q, k8, v8, tables, ctx, k_scale, v_scale) -> float:
    n = min(CHECKED, q.shape[0])
    want = ref.paged_attention(q[:n].float(), k8, v8, tables[:n], list(range(n + 1)),
                               [ctx] * n, D ** -0.5, k_scale, v_scale)
    vmax = ref.dequantize_kv(v8, v_scale, torch.float32).abs().max().item()
    return (out[:n].float() - want).abs().max().item() / vmax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="attn_decode_fp8.json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--modes", default="old,cvt,qk8,qk8x1")
    ap.add_argument("--rep-ms", type=int, default=100)
    args = ap.parse_args()
    modes = args.modes.split(",")
    assert all(m in E4M3_MODES for m in modes), modes
    torch.manual_seed(0)
    rows = []
    print(f"{'batch':>5} {'ctx':>5} {'mode':6} {'config':>10} {'ms':>8} {'TB/s':>6} "
          f"{'err/max|V|':>10} {'vs old':>7}")
    for batch, ctx in SHAPES:
        q, k8, v8, tables, lens, k_scale, v_scale = make(batch, ctx)
        nbytes = 2 * batch * ctx * KV_HEADS * D
        base = None
        for mode in modes:
            run = partial(paged_attention_decode, q, k8, v8, tables, lens, D ** -0.5,
                          k_scale=k_scale, v_scale=v_scale, e4m3_mode=mode)
            err = error(run(), q, k8, v8, tables, ctx, k_scale, v_scale)
            configs = [decode_config(torch.float8_e4m3fn, D, 16, False, mode)]
            if args.sweep:
                configs += [c for c in SWEEP if c != configs[0]]
            for i, (block_n, stages, warps) in enumerate(configs):
                fn = partial(run, block_n=block_n, num_stages=stages, num_warps=warps)
                try:
                    ms = do_bench(fn, warmup=10, rep=args.rep_ms, return_mode="median")
                except Exception as e:  # noqa: BLE001 -- out of shared memory etc.
                    print(f"  skip {mode} {block_n},{stages},{warps}: {type(e).__name__}")
                    continue
                row = dict(batch=batch, ctx=ctx, mode=mode, default=i == 0, block_n=block_n,
                           stages=stages, warps=warps, ms=ms, tbps=nbytes / ms / 1e9,
                           err=err)
                rows.append(row)
                if i == 0 and mode == modes[0]:
                    base = ms
            mine = [r for r in rows if (r["batch"], r["ctx"], r["mode"]) == (batch, ctx, mode)]
            if not mine:
                continue
            for r in [mine[0]] + ([min(mine, key=lambda r: r["ms"])] if args.sweep else []):
                tag = "default" if r["default"] else "best"
                cfg = f"{r['block_n']}/{r['stages']}/{r['warps']}"
                ratio = f"{base / r['ms']:6.2f}x" if base else ""
                print(f"{batch:5d} {ctx:5d} {mode:6} {cfg:>10} {r['ms']:8.4f} "
                      f"{r['tbps']:6.2f} {r['err']:10.2e} {ratio:>7} {tag}", flush=True)
        del q, k8, v8, tables
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
