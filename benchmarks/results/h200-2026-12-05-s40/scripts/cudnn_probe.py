"""40th session probe: can kiln's prompts reach SDPA's cuDNN backend (0.99 ms at 8k vs the
Triton kernel's 1.49)? Varlen (nested jagged tensors), bottom-right causal (chunks over a
cached prefix), and the raw op's schema."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

H, KH, D = 32, 8, 128
dev, dt = "cuda", torch.bfloat16
for name in ("_cudnn_attention_forward", "_scaled_dot_product_cudnn_attention"):
    op = getattr(torch.ops.aten, name, None)
    print(name, op.default._schema if op is not None else "missing", flush=True)


def t(label, fn):
    try:
        fn()
        ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
        print(f"{label:50s} {ms:8.4f} ms", flush=True)
    except Exception as e:
        print(f"{label:50s} {type(e).__name__}: {str(e)[:200]}", flush=True)


# bottom-right causal: 8192 new tokens over 24576 cached
q = torch.randn(1, H, 8192, D, device=dev, dtype=dt)
k = torch.randn(1, KH, 32768, D, device=dev, dtype=dt)
v = torch.randn_like(k)
from torch.nn.attention.bias import causal_lower_right
bias = causal_lower_right(8192, 32768)
for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
    def f(be=be):
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    t(f"lower-right 8192@24576 {be.name}", f)
kx = k.repeat_interleave(4, 1); vx = v.repeat_interleave(4, 1)
def g():
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, kx, vx, attn_mask=bias)
t("lower-right 8192@24576 CUDNN, K/V expanded to 32 heads", g)
# varlen through nested jagged tensors
lens = [1000, 700, 1300, 1000] * 4
qs = [torch.randn(n, H, D, device=dev, dtype=dt) for n in lens]
ks = [torch.randn(n, KH, D, device=dev, dtype=dt) for n in lens]
vs = [torch.randn_like(x) for x in ks]
def nest(xs):
    return torch.nested.nested_tensor(xs, layout=torch.jagged).transpose(1, 2)
nq, nk, nv = nest(qs), nest(ks), nest(vs)
nkx = nest([x.repeat_interleave(4, 1) for x in ks]); nvx = nest([x.repeat_interleave(4, 1) for x in vs])
for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
    def h(be=be):
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(nq, nk, nv, is_causal=True, enable_gqa=True)
    t(f"jagged 16 prompts (700-1300) {be.name} gqa", h)
    def h2(be=be):
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(nq, nkx, nvx, is_causal=True)
    t(f"jagged 16 prompts (700-1300) {be.name} expanded", h2)
