"""Micro-benchmark of each kernel against the torch reference (and SDPA for attention) at
Llama-3.1-8B shapes on one GPU: prints a table and writes JSON.

    python -m kiln.kernels.bench [out.json] [--only attention] [--rep-ms 200]

Attention and the KV-cache write also run with 1-byte KV caches (`kv=fp8`: e4m3fn,
`kv=int8`, per-KV-head scales), timed without the reference and SDPA (see the bf16 rows).

Times are medians from triton.testing.do_bench (CUDA events). GB/s counts the bytes a
kernel must move at least (each input read once, each output written once); inputs
smaller than L2 (50 MB on H100) stay cached between repeats, so small cases overstate it.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from kiln.kernels import reference as ref
from kiln.kernels.attention_decode import paged_attention_decode
from kiln.kernels.attention_prefill import paged_attention_prefill
from kiln.kernels.rms_norm import add_rms_norm, rms_norm
from kiln.kernels.rotary_kv import rotary_and_write_kv
from kiln.kernels.sampling import sample_tokens
from kiln.kernels.silu_mul import silu_and_mul

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTER, VOCAB = 32, 8, 128, 4096, 14336, 128256
BLOCK_SIZE = 16
DT = torch.bfloat16
QUANT_KV = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}  # 1-byte KV cache rows


@dataclass
class Result:
    op: str
    shape: str
    kiln_ms: float
    gbps: float
    tflops: float | None
    reference_ms: float | None
    sdpa_ms: float | None


Fn = Callable[[], object]


def _ms(fn: Fn | None, rep_ms: int) -> float | None:
    return None if fn is None else do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def _cuda(*shape: int, dtype: torch.dtype = DT) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=dtype)


def elementwise_cases() -> list[tuple[str, str, Fn, Fn, Fn | None, float, float]]:
    """(op, shape, kiln, reference, sdpa, bytes, flops) for the memory-bound ops."""
    cases = []
    for tokens in (64, 4096):
        x, r, w = _cuda(tokens, HIDDEN), _cuda(tokens, HIDDEN), _cuda(HIDDEN)
        nbytes = tokens * HIDDEN * 2
        cases.append(("rms_norm", f"{tokens}x{HIDDEN}", partial(rms_norm, x, w, 1e-5),
                      partial(ref.rms_norm, x, w, 1e-5), None, 2 * nbytes, 0))
        cases.append(("add_rms_norm", f"{tokens}x{HIDDEN}", partial(add_rms_norm, x, r, w, 1e-5),
                      partial(ref.add_rms_norm, x, r, w, 1e-5), None, 4 * nbytes, 0))
        g = _cuda(tokens, 2 * INTER)
        cases.append(("silu_and_mul", f"{tokens}x{2 * INTER}", partial(silu_and_mul, g),
                      partial(ref.silu_and_mul, g), None, 3 * tokens * INTER * 2, 0))
        qkv = _cuda(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
        positions = torch.randint(0, 8192, (tokens,), device="cuda")
        cos_sin = torch.randn(8192, HEAD_DIM, device="cuda")
        caches = [_cuda(4096, BLOCK_SIZE, KV_HEADS, HEAD_DIM) for _ in range(2)]
        slots = torch.randperm(4096 * BLOCK_SIZE, device="cuda")[:tokens]
        args = (q, k, v, positions, cos_sin, *caches, slots, HEAD_DIM)
        moved = 2 * tokens * (HEADS + 2 * KV_HEADS) * HEAD_DIM * 2 + tokens * HEAD_DIM * 4
        cases.append(("rotary_and_write_kv", f"{tokens} tokens",
                      partial(rotary_and_write_kv, *args),
                      partial(ref.rotary_and_write_kv, *args), None, moved, 0))
        for kv, dtype in QUANT_KV.items():
            quant = [_quantized(c, dtype) for c in caches]
            args = (q, k, v, positions, cos_sin, quant[0][0], quant[1][0], slots, HEAD_DIM,
                    quant[0][1], quant[1][1])
            moved_q = moved - tokens * 2 * KV_HEADS * HEAD_DIM  # 1-byte K, V writes
            cases.append(("rotary_and_write_kv", f"{tokens} tokens kv={kv}",
                          partial(rotary_and_write_kv, *args),
                          partial(ref.rotary_and_write_kv, *args), None, moved_q, 0))
    return cases


def _quantized(cache: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1-byte copy of a [blocks, block_size, kv_heads, d] cache, and its per-head scales."""
    amax = cache.abs().amax(dim=(0, 1, 3)).float()
    scale = (amax / (ref.FP8_MAX if dtype == torch.float8_e4m3fn else ref.INT8_MAX)).contiguous()
    return ref.quantize_kv(cache.flatten(0, 1), scale, dtype).view(cache.shape), scale


def _paged(seq_lens: list[int], q_lens: list[int]):
    blocks = [-(-n // BLOCK_SIZE) for n in seq_lens]
    k_cache = _cuda(sum(blocks), BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(sum(blocks), device="cuda").int()
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device="cuda")
    for i, used in enumerate(blocks):
        tables[i, :used], order = order[:used], order[used:]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    q = _cuda(starts[-1], HEADS, HEAD_DIM)
    return q, k_cache, v_cache, tables, starts


def attention_cases() -> list[tuple[str, str, Fn, Fn, Fn | None, float, float]]:
    cases = []
    scale = HEAD_DIM ** -0.5
    kv_token_bytes = 2 * KV_HEADS * HEAD_DIM * 2  # K and V, bf16 (1-byte caches: half)
    for batch in (1, 16, 64):
        for ctx in (1024, 8192):
            q, k_cache, v_cache, tables, starts = _paged([ctx] * batch, [1] * batch)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            # SDPA over the same K/V laid out contiguously (no paging): [B, kv_heads, ctx, d]
            k_flat = k_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
            v_flat = v_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
            q4 = q.view(batch, HEADS, 1, HEAD_DIM)
            cases.append((
                "decode_attention", f"B={batch} ctx={ctx}",
                partial(paged_attention_decode, q, k_cache, v_cache, tables, lens, scale),
                partial(ref.paged_attention, q, k_cache, v_cache, tables, starts,
                        [ctx] * batch, scale),
                partial(F.scaled_dot_product_attention, q4, k_flat, v_flat, scale=scale,
                        enable_gqa=True),
                batch * ctx * kv_token_bytes, 4 * batch * ctx * HEADS * HEAD_DIM))
            for kv, dtype in QUANT_KV.items():
                (k_q, k_scale), (v_q, v_scale) = _quantized(k_cache, dtype), _quantized(v_cache,
                                                                                        dtype)
                cases.append((
                    "decode_attention", f"B={batch} ctx={ctx} kv={kv}",
                    partial(paged_attention_decode, q, k_q, v_q, tables, lens, scale,
                            k_scale=k_scale, v_scale=v_scale),
                    None, None, batch * ctx * kv_token_bytes / 2,
                    4 * batch * ctx * HEADS * HEAD_DIM))
    for num_seqs, new, ctx in ((1, 4096, 4096), (1, 8192, 8192), (8, 1024, 1024),
                               (4, 512, 4096)):
        q, k_cache, v_cache, tables, starts = _paged([ctx] * num_seqs, [new] * num_seqs)
        qsl = torch.tensor(starts, dtype=torch.int32, device="cuda")
        lens = torch.full((num_seqs,), ctx, dtype=torch.int32, device="cuda")
        sdpa = None
        if new == ctx:  # plain causal prefill: SDPA over contiguous [B, H, L, d]
            q4 = q.view(num_seqs, new, HEADS, HEAD_DIM).transpose(1, 2)
            k4 = _cuda(num_seqs, KV_HEADS, ctx, HEAD_DIM)
            v4 = torch.randn_like(k4)
            sdpa = partial(F.scaled_dot_product_attention, q4, k4, v4, is_causal=True,
                           scale=scale, enable_gqa=True)
        # causal: query j of a sequence sees (ctx - new + j + 1) keys
        pairs = num_seqs * (new * (ctx - new) + new * (new + 1) / 2)
        cases.append((
            "prefill_attention", f"{num_seqs}x{new} new / {ctx} ctx",
            partial(paged_attention_prefill, q, k_cache, v_cache, tables, qsl, lens, new, scale),
            partial(ref.paged_attention, q, k_cache, v_cache, tables, starts, [ctx] * num_seqs,
                    scale),
            sdpa, num_seqs * ctx * kv_token_bytes + 2 * q.numel() * 2,
            4 * pairs * HEADS * HEAD_DIM))
        for kv, dtype in QUANT_KV.items():
            (k_q, k_scale), (v_q, v_scale) = _quantized(k_cache, dtype), _quantized(v_cache,
                                                                                    dtype)
            cases.append((
                "prefill_attention", f"{num_seqs}x{new} new / {ctx} ctx kv={kv}",
                partial(paged_attention_prefill, q, k_q, v_q, tables, qsl, lens, new, scale,
                        k_scale=k_scale, v_scale=v_scale),
                None, None, num_seqs * ctx * kv_token_bytes / 2 + 2 * q.numel() * 2,
                4 * pairs * HEADS * HEAD_DIM))
    return cases


def sampling_cases() -> list[tuple[str, str, Fn, Fn, Fn | None, float, float]]:
    cases = []
    for rows in (1, 64):
        for label, top_k, top_p in (("plain", 0, 1.0), ("top-k 50 + top-p 0.9", 50, 0.9),
                                    ("top-p 0.95", 0, 0.95)):
            logits = torch.randn(rows, VOCAB, device="cuda") * 3
            params = (torch.full((rows,), 0.8, device="cuda"),
                      torch.full((rows,), top_k, device="cuda", dtype=torch.int64),
                      torch.full((rows,), top_p, device="cuda"), torch.zeros(rows, device="cuda"),
                      torch.arange(rows, device="cuda"), torch.zeros(rows, device="cuda",
                                                                     dtype=torch.int64))
            cases.append(("sample_tokens", f"B={rows} {label}",
                          partial(sample_tokens, logits, *params),
                          partial(ref.sample_tokens, logits, *params), None, rows * VOCAB * 4, 0))
    return cases


GROUPS = {"elementwise": elementwise_cases, "attention": attention_cases,
          "sampling": sampling_cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="kernel_bench.json", help="JSON output path")
    parser.add_argument("--only", choices=sorted(GROUPS), action="append")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time")
    args = parser.parse_args()
    torch.manual_seed(0)
    results: list[Result] = []
    print(f"{'op':20} {'shape':34} {'kiln ms':>9} {'GB/s':>7} {'TFLOP/s':>7} "
          f"{'ref ms':>9} {'speedup':>7} {'sdpa ms':>9}")
    for group in args.only or list(GROUPS):
        for op, shape, kiln, reference, sdpa, nbytes, flops in GROUPS[group]():
            kiln_ms = _ms(kiln, args.rep_ms)
            assert kiln_ms is not None
            r = Result(op, shape, kiln_ms, nbytes / kiln_ms / 1e6,
                       flops / kiln_ms / 1e9 if flops else None,
                       _ms(reference, args.rep_ms), _ms(sdpa, args.rep_ms))
            results.append(r)
            speedup = f"{r.reference_ms / kiln_ms:6.1f}x" if r.reference_ms else ""
            print(f"{op:20} {shape:34} {kiln_ms:9.4f} {r.gbps:7.0f} "
                  f"{r.tflops or 0:7.1f} {r.reference_ms or 0:9.4f} {speedup:>7} "
                  f"{r.sdpa_ms or 0:9.4f}", flush=True)
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version()}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
