"""Decode-batch W4A16 / W8A16 GEMMs (4 / 16 / 64 rows: the GEMV and the tl.dot tiles of
kiln/kernels/int_gemm.py) at Llama-3.1-8B shapes against bf16 cuBLAS at the same rows, on
a GPU: microseconds a call inside a CUDA graph (weights cycled through copies, so read
from HBM), over a grid of launches (block_m, block_n, block_k, warps, stages, K splits,
whether the scales are applied to each K step's product, `IntGemmConfig.factored`, or the
product is integer on x's digit planes, `IntGemmConfig.digits`, or the tile computed
transposed, `IntGemmConfig.swap`, int4 unpacked by bit operations, `IntGemmConfig.magic`)
and kiln's own choice
("auto"). Issue #10's 64-request row (int4 >= bf16 throughput) is
decode at up to 64 rows; this is where its time goes.

    python benchmarks/int_batch_bench.py OUT.json [--rows 4,16,64] [--bits 4,8] [--magic]
"""

from __future__ import annotations

import argparse
import json

import torch
from int_gemv_bench import SHAPES, int_weight, n_copies, timed, weight_copies

# block_n, block_k, warps, stages, split_k, nibble_dots[, words[, factored[, digits[, swap[,
# magic[, sum_dot]]]]]]
# (block_m: the rows, 16 to 64): the defaults of the fifteenth session (16 x 32 x 128 x 2
# splits up to 16 rows; at 64 rows 32 x 128 where N is small, else int4 64 x 128, int8 64
# x 128 x 8 warps) and their neighbours, plain and factored (the scales applied to each K step's
# product: _factored_dot); the even/odd-k products and int4 words lost before
LAUNCHES = [
    (32, 128, 4, 3, 2, False), (32, 64, 4, 4, 1, False), (64, 128, 4, 3, 2, False),
    (64, 128, 8, 3, 2, False), (32, 128, 4, 3, 1, False), (32, 256, 4, 3, 2, False),
    (32, 128, 4, 3, 2, False, False, True), (32, 128, 8, 3, 2, False, False, True),
    (64, 128, 4, 3, 2, False, False, True), (64, 128, 8, 3, 2, False, False, True),
    (32, 64, 4, 4, 2, False, False, True), (32, 64, 4, 4, 1, False, False, True),
    (32, 256, 4, 3, 2, False, False, True), (64, 64, 4, 4, 2, False, False, True),
    (16, 128, 4, 3, 2, False, False, True), (32, 128, 4, 4, 2, False, False, True),
    # int8 tl.dot on x's digit planes (kiln.kernels.int_gemm_digits, a ninth field)
    (32, 128, 4, 3, 2, False, False, False, True), (64, 128, 4, 3, 2, False, False, False, True),
    (32, 256, 4, 3, 2, False, False, False, True), (64, 64, 4, 3, 2, False, False, False, True),
    (64, 128, 8, 3, 2, False, False, False, True), (32, 128, 4, 3, 1, False, False, False, True),
    (128, 128, 8, 3, 2, False, False, False, True), (64, 256, 8, 3, 2, False, False, False, True),
    # one split (int8 per channel: each split's int32 sums scaled once, ONE_GROUP)
    (64, 128, 4, 3, 1, False, False, False, True), (32, 256, 4, 3, 1, False, False, False, True),
    (64, 256, 4, 3, 1, False, False, False, True), (128, 128, 8, 3, 1, False, False, False, True),
    (64, 64, 4, 4, 1, False, False, False, True), (32, 64, 4, 4, 1, False, False, False, True),
    # the tile computed transposed (out^T = w x^T: the weight tile wgmma's register operand,
    # a tenth field), plain and (int8 grouped only: int8 per channel takes the digits) factored
    *[(*t, *[False] * 4, True) for t in (
        (128, 128, 4, 3, 2), (128, 128, 4, 3, 4), (64, 128, 4, 3, 2), (64, 128, 4, 3, 4),
        (128, 64, 4, 4, 2), (128, 64, 4, 4, 4), (256, 64, 8, 3, 2), (128, 128, 8, 3, 2))],
    # transposed and int4 unpacked by bit operations (magic, an eleventh field; int4's
    # default since the seventeenth session: 64 x 128, 2 splits) and their neighbours
    *[(*t, *[False] * 4, True, True) for t in (
        (64, 128, 4, 3, 1), (64, 128, 4, 4, 2), (64, 128, 4, 3, 4), (64, 64, 4, 3, 2),
        (128, 128, 4, 3, 2), (128, 128, 8, 3, 2), (64, 256, 4, 3, 2))],
    # transposed magic tiles with deeper cp.async rings, for one row (29th session: the
    # swapped bf16 GEMV beat cuBLAS with 4-8 stages; int4 batch 1 is latency-bound)
    *[(*t, *[False] * 4, True, True) for t in (
        (64, 128, 4, 6, 1), (64, 128, 4, 8, 1), (64, 128, 4, 6, 2), (64, 256, 4, 4, 1),
        (128, 128, 4, 6, 1))],
    # the same, the sums of x by a tl.dot with ones (sum_dot, a twelfth field; sm_90 SASS
    # at 64 rows 7.1 instructions a weight and 168 registers against 9.7 and 220)
    *[(*t, *[False] * 4, True, True, True) for t in (
        (64, 128, 4, 3, 2), (64, 128, 4, 3, 1), (128, 128, 4, 3, 2), (128, 128, 8, 3, 2))]]

# Up to GEMV_ROWS rows, GEMV launches too: (block_n, block_k, split_k, warps, stages,
# factored), factored being kiln.kernels.int_gemv_rows (no spills at 4 rows under Triton
# 3.6 in these tiles); kiln's choice ("auto") there is 16-row tiles since the fifteenth
# session (the plain split-K GEMV was 6.7x slower)
GEMV_LAUNCHES = [(64, 128, 8, 4, 3, True), (64, 128, 8, 8, 3, True)] + [
    # int4 with bfloat16 x, products in bfloat16 pairs, each word unpacked once for all
    # rows (kiln.kernels.int_gemv_pairs, a seventh field; sm_90 SASS at 32 x 256: 2.8
    # instructions a weight and row at 2 rows, 2.25 at 4, against 3.9 at one; untimed)
    (32, 256, 4, 4, 3, False, True), (64, 128, 8, 4, 3, False, True),
    (32, 256, 1, 4, 3, False, True), (64, 128, 16, 4, 3, False, True),
    (32, 128, 8, 4, 3, False, True)]


def main() -> None:
    from kiln.kernels import int_gemm

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    # 4 rows: the launches and kiln's choice are 16-row tiles, beside the factored GEMV
    ap.add_argument("--rows", default="4,16,64")
    ap.add_argument("--most", type=int, default=0, help="only the first N launches")
    ap.add_argument("--bits", default="4,8", help="the weights' widths to time")
    ap.add_argument("--magic", action="store_true", help="only the magic (and sum_dot) launches")
    args = ap.parse_args()
    launches = LAUNCHES[:args.most] if args.most else LAUNCHES
    if args.magic:
        launches = [v for v in launches if len(v) > 10 and v[10]]
    results = []
    for M in (int(v) for v in args.rows.split(",")):
        for name, (N, K) in SHAPES.items():
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w16s = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
                    for _ in range(n_copies(N * K * 2))]
            cublas = timed([lambda a=x, w=w: a @ w.T for w in w16s])
            print(f"M {M} {name:8s} bf16 cublas {cublas:8.1f} us", flush=True)
            results.append(dict(M=M, shape=name, kind="bf16", config="cublas", us=cublas))
            for bits in (int(v) for v in args.bits.split(",")):
                weight, scale, offset, nbytes = int_weight(N, K, bits)
                want = int_gemm.int_weight_linear(x.float(), weight, scale, offset)
                copies = weight_copies(weight, scale, offset, nbytes)
                rows = []
                gemv = GEMV_LAUNCHES if M <= int_gemm.GEMV_ROWS else []
                for is_gemv, launch in [(False, None)] + [(False, v) for v in launches] + \
                        [(True, v) for v in gemv]:
                    words = bool(launch and len(launch) > 6 and launch[6])
                    factored = bool(launch and len(launch) > 7 and launch[7])
                    digits = bool(launch and len(launch) > 8 and launch[8])
                    swap = bool(launch and len(launch) > 9 and launch[9])
                    magic = bool(launch and len(launch) > 10 and launch[10])
                    sum_dot = bool(launch and len(launch) > 11 and launch[11])
                    if is_gemv:  # (block_n, block_k, split, warps, stages, factored[, pairs])
                        pairs = len(launch) > 6 and launch[6]
                        if pairs and bits == 8:
                            continue
                        cfg = int_gemm.IntGemmConfig(0, *launch[:2], *launch[3:5],
                                                     split_k=launch[2], factored=launch[5],
                                                     pairs=pairs)
                    elif launch and (launch[5] or words or magic) and bits == 8:
                        continue
                    else:
                        cfg = launch and int_gemm.IntGemmConfig(
                            min(64, max(16, M)), launch[0], launch[1], launch[2], launch[3],
                            split_k=launch[4], nibble_dots=launch[5], words=words,
                            factored=factored, digits=digits, swap=swap, magic=magic,
                            sum_dot=sum_dot)
                    try:
                        got = int_gemm.int_weight_linear(x, weight, scale, offset, config=cfg)
                        err = ((got.float() - want).norm() / want.norm()).item()
                        us = timed([lambda a=x, c=cfg, w=w: int_gemm.int_weight_linear(
                            a, *w, config=c) for w in copies])
                    except Exception as e:  # past the card's shared memory or registers
                        print(f"  int{bits} {launch}: {type(e).__name__}", flush=True)
                        continue
                    rows.append(dict(M=M, shape=name, kind=f"int{bits}",
                                     config=("gemv " if is_gemv else "") + str(launch or "auto"),
                                     us=us, rel_err=err,
                                     gbps=nbytes / us / 1e3, vs_bf16=cublas / us))
                rows.sort(key=lambda r: r["us"])
                auto = next(r for r in rows if r["config"] == "auto")
                for r in [auto] + rows[:4]:
                    print(f"  int{bits} {r['config']:36s} {r['us']:8.1f} us "
                          f"{r['vs_bf16']:.2f}x cuBLAS bf16  err {r['rel_err']:.1e}", flush=True)
                results += rows
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "launches": len(launches),
                   "results": results}, f, indent=1)
    print("\nper layer (qkv + o + gate_up + down), us: auto / best launch per shape / bf16")
    for M in sorted({r["M"] for r in results}):
        for kind in ("int4", "int8"):
            sel = [r for r in results if r["M"] == M and r["kind"] == kind]
            if not sel:
                continue
            auto = sum(r["us"] for r in sel if r["config"] == "auto")
            best = sum(min(r["us"] for r in sel if r["shape"] == s) for s in SHAPES)
            bf16 = sum(r["us"] for r in results if r["M"] == M and r["kind"] == "bf16")
            print(f"M {M:3d} {kind}: {auto:7.1f} / {best:7.1f} / {bf16:7.1f}")


if __name__ == "__main__":
    main()
