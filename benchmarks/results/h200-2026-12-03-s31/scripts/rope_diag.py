"""Where the fused QKV GEMV + rotary differs from the GEMV then rotary_kv at 8B shape:
both against a torch emulation of the roundings (each product and the sum to bf16)."""
import torch
from kiln.kernels import gemv_swap as gs
from kiln.kernels.gemv_swap_rope import RopeArgs
from kiln.kernels.rotary_kv import rotary_and_write_kv


def emulate(t, pos, cos_sin, heads):
    t = t.view(t.shape[0], heads, 128).float()
    cs = cos_sin[pos].to(torch.bfloat16).float()
    cos, sin = cs[:, None, :64], cs[:, None, 64:]
    a1, a2 = t[..., :64], t[..., 64:]
    r = lambda z: z.to(torch.bfloat16).float()  # noqa: E731
    y1 = r(r(a1 * cos) + r(-a2 * sin))
    y2 = r(r(a2 * cos) + r(a1 * sin))
    return torch.cat([y1, y2], -1).view(t.shape[0], -1).to(torch.bfloat16)


for M in (1, 5, 16):
    g = torch.Generator(device="cuda").manual_seed(M)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(6144, 4096, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(M, 4096, device="cuda", generator=g).to(torch.bfloat16)
    pos = torch.randint(0, 2000, (M,), device="cuda", generator=g)
    slots = torch.arange(M, device="cuda")
    inv = 1.0 / 500000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128)
    ang = torch.arange(2048, device="cuda").float()[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], 1)
    caches = [torch.zeros(64, 16, 8, 128, **bf) for _ in range(2)]
    mine = [c.clone() for c in caches]
    q, k, v = gs.gemv_swap(x, w).split([4096, 1024, 1024], 1)
    want = rotary_and_write_kv(q, k, v, pos, cos_sin, *caches, slots, 128)
    got = gs.gemv_swap(x, w, rope=RopeArgs(pos, cos_sin, *mine, slots, 32, 8))
    emu = emulate(q, pos, cos_sin, 32)
    vm = mine[1].view(-1, 8 * 128)[:M]
    print(f"M={M}: fused vs rotary_kv {(got != want).sum().item()} / {got.numel()}; "
          f"fused vs emulation {(got != emu).sum().item()}; rotary_kv vs emulation "
          f"{(want != emu).sum().item()}; V fused vs plain GEMV {(vm != v).sum().item()}; "
          f"K caches differ {(mine[0] != caches[0]).sum().item()}")
    if (got != emu).any():
        i = (got != emu).nonzero()[0].tolist()
        print("  first fused/emu diff at", i, got[i[0], i[1]].item(), emu[i[0], i[1]].item(),
              want[i[0], i[1]].item())
