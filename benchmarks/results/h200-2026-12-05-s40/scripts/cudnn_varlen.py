"""40th session probe 2: aten._cudnn_attention_forward over packed prompts ((T, H, D), cum_seq
offsets), GQA and expanded, equal and varied lengths, against the dense SDPA cuDNN call
(0.315 ms for 16 x 1000 in call 3) and kiln's Triton kernel (0.543)."""
import time

import torch
from triton.testing import do_bench

H, KH, D = 32, 8, 128
dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)


def case(lens, kv_heads):
    T = sum(lens)
    q = torch.randn(T, H, D, device=dev, dtype=dt)
    k = torch.randn(T, kv_heads, D, device=dev, dtype=dt)
    v = torch.randn_like(k)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=dev, dtype=torch.int32)
    m = max(lens)

    def f():
        return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, m, m, False, 0.0,
                                                       True, False, scale=D ** -0.5)[0]
    return f, q, k, v, cu


for label, lens in (("16 x 1000", [1000] * 16), ("16 varied 700-1300", [1000, 700, 1300, 1000] * 4),
                    ("1 x 8192", [8192])):
    for kv in (KH, H):
        try:
            f, q, k, v, cu = case(lens, kv)
            t = time.perf_counter(); out = f(); torch.cuda.synchronize()
            first = (time.perf_counter() - t) * 1e3
            ref = torch.ops.aten._flash_attention_forward(
                q, k, v, cu, cu, max(lens), max(lens), 0.0, True, False, scale=D ** -0.5)[0]
            err = (out.float() - ref.float()).abs().max().item()
            ms = do_bench(f, warmup=10, rep=100, return_mode="median")
            print(f"{label:22s} kv heads {kv:2d}: {ms:8.4f} ms (first call {first:.0f} ms, "
                  f"max |diff| vs flash {err:.4f})", flush=True)
        except Exception as e:
            print(f"{label:22s} kv heads {kv:2d}: {type(e).__name__}: {str(e)[:300]}", flush=True)

# A chunk over a cached prefix: is the raw op's causal mask aligned bottom-right (what a
# chunk needs, as the flash op does) or top-left?
for nq, nk in ((8192, 32768), (1000, 3000)):
    try:
        q = torch.randn(nq, H, D, device=dev, dtype=dt)
        k = torch.randn(nk, KH, D, device=dev, dtype=dt)
        v = torch.randn_like(k)
        cq = torch.tensor([0, nq], device=dev, dtype=torch.int32)
        ck = torch.tensor([0, nk], device=dev, dtype=torch.int32)
        f = lambda: torch.ops.aten._cudnn_attention_forward(  # noqa: E731
            q, k, v, None, cq, ck, nq, nk, False, 0.0, True, False, scale=D ** -0.5)[0]
        out = f()
        ref = torch.ops.aten._flash_attention_forward(
            q, k, v, cq, ck, nq, nk, 0.0, True, False, scale=D ** -0.5)[0]
        err = (out.float() - ref.float()).abs().max().item()
        ms = do_bench(f, warmup=10, rep=100, return_mode="median")
        fl = do_bench(lambda: torch.ops.aten._flash_attention_forward(
            q, k, v, cq, ck, nq, nk, 0.0, True, False, scale=D ** -0.5)[0], warmup=10, rep=100,
            return_mode="median")
        print(f"chunk {nq}@{nk - nq}: cudnn {ms:.4f} ms, flash {fl:.4f} ms, max |diff| vs "
              f"flash (bottom-right) {err:.4f}", flush=True)
    except Exception as e:
        print(f"chunk {nq}@{nk - nq}: {type(e).__name__}: {str(e)[:300]}", flush=True)
