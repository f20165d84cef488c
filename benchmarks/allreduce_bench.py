# ruff: noqa: B023  (each lambda is timed right where it is made)
"""Latency of a small tensor-parallel all-reduce (one decode step's hidden states) on two
GPUs, inside a CUDA graph as a decode step calls it (64 calls per graph, like a 32-layer
model): NCCL, PyTorch's symmetric-memory one-shot, kiln's one-shot, and kiln's one-shot
fused with the residual add + RMSNorm (vs NCCL followed by kiln's add_rms_norm).
Checks each against NCCL first.

    python benchmarks/allreduce_bench.py [OUT.json]
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def time_graph(fn, reps: int = 64, iters: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dist.barrier()
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) * 1000 / (iters * reps), 2)


def worker(rank: int, world: int, port: int, out: str) -> None:
    sys.path.insert(0, os.getcwd())
    from kiln.distributed import custom_allreduce
    from kiln.kernels.rms_norm import add_rms_norm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    group = dist.group.WORLD
    custom = custom_allreduce.CustomAllReduce(group, dev, 256, 4096, torch.bfloat16)
    if rank == 0:
        print("symm_mem ops:", [n for n in dir(torch.ops.symm_mem) if "reduce" in n], flush=True)
    rows = {}
    w = torch.rand(4096, device=dev, dtype=torch.bfloat16) + 0.5
    for tokens in (1, 8, 64, 256):
        torch.manual_seed(tokens * 10 + rank)
        x = torch.randn(tokens, 4096, device=dev, dtype=torch.bfloat16)
        torch.manual_seed(tokens)
        res = torch.randn(tokens, 4096, device=dev, dtype=torch.bfloat16)
        ref = x.clone()
        dist.all_reduce(ref)
        got = custom.all_reduce(x)
        gathered = [torch.empty_like(got) for _ in range(world)]
        dist.all_gather(gathered, got)
        row = {"kiln_equal_nccl": bool(torch.equal(got, ref)),
               "kiln_same_on_ranks": all(torch.equal(gathered[0], g) for g in gathered)}
        want_y, want_r = add_rms_norm(ref, res, w, 1e-5)
        got_y, got_r = custom.all_reduce_add_rms_norm(x, res, w, 1e-5)
        row["fused_equal"] = bool(torch.equal(got_y, want_y) and torch.equal(got_r, want_r))
        row["nccl_us"] = time_graph(lambda: dist.all_reduce(x))
        row["kiln_one_shot_us"] = time_graph(lambda: custom.all_reduce(x))
        row["nccl_then_add_rms_norm_us"] = time_graph(
            lambda: add_rms_norm(dist.all_reduce(x) or x, res, w, 1e-5))
        row["kiln_fused_us"] = time_graph(lambda: custom.all_reduce_add_rms_norm(x, res, w, 1e-5))
        try:
            import torch.distributed._symmetric_memory as symm_mem
            buf = symm_mem.empty(tokens, 4096, dtype=torch.bfloat16, device=dev)
            symm_mem.rendezvous(buf, group.group_name)
            buf.copy_(x)
            got = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group.group_name)
            row["torch_one_shot_ok"] = bool(torch.allclose(got.float(), ref.float(), atol=0.1))
            row["torch_one_shot_us"] = time_graph(
                lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group.group_name))
        except Exception as e:  # noqa: BLE001
            row["torch_error"] = f"{type(e).__name__}: {e}"[:200]
        rows[tokens] = row
        if rank == 0:
            print(tokens, row, flush=True)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    dist.barrier()
    os._exit(0)  # skip NCCL teardown: the numbers are written


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    from kiln.distributed.launch import free_port
    out = sys.argv[1] if len(sys.argv) > 1 else "allreduce.json"
    mp.spawn(worker, args=(2, free_port(), out), nprocs=2)
