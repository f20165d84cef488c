"""53rd session: programs a Hopper SM holds of kiln.kernels.int_wgmma's kernel per rows a
program (the driver's occupancy answer for its shared memory, registers and warps), and
the launch's grid: is 16 rows' slowness (o 33.1 us against 12.9 at 8 rows) a second wave?"""
import ctypes

import torch

from kiln.kernels import int_wgmma

cuda = ctypes.CDLL("libcuda.so.1")
kernel = int_wgmma._w4_wgmma_kernel
seen = []


class Spy:
    def __getitem__(self, grid):
        def launch(*a, **k):
            seen.append((grid, kernel[grid](*a, **k)))
        return launch


int_wgmma._w4_wgmma_kernel = Spy()
for name, n, k in (("o", 4096, 4096), ("down", 4096, 14336), ("gate_up", 28672, 4096)):
    for m in (8, 12, 16, 24, 32, 64):
        for stages in (3, 2):
            cfg = int_wgmma.wgmma_config(m, n, k)
            cfg = type(cfg)(cfg.block_n, cfg.block_k, cfg.split_k, stages, cfg.fast)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randint(0, 255, (n, k // 2), device="cuda", dtype=torch.uint8)
            s = torch.rand(n, k // 128, device="cuda") * 0.01
            int_wgmma.w4_wgmma(x, w, s, s, None, cfg)
            grid, ck = seen[-1]
            ck._init_handles()
            blocks = ctypes.c_int()
            rc = cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(
                ctypes.byref(blocks), ctypes.c_void_p(ck.function), ck.metadata.num_warps * 32,
                ctypes.c_size_t(ck.metadata.shared))
            print(f"{name:8s} rows {m:3d} stages {stages} grid {grid} shared "
                  f"{ck.metadata.shared} regs {ck.n_regs} programs/SM {blocks.value} (rc {rc})",
                  flush=True)
