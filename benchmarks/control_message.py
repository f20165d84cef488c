"""Cost of the per-step control message of a multi-rank engine (rank 0 -> workers), on
the CPU of this machine, for both channels kiln has: messages over the gloo group
(kiln.distributed.launch.Channel, ranks a launcher started) and the shared-memory ring
(ShmChannel, workers kiln spawned): the sender's time per send, and the one-way latency
a worker sees (send to recv return).

    python benchmarks/control_message.py [--steps 2000] [--out control.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, port: int, steps: int, out: str, spec: dict) -> None:
    sys.path.insert(0, os.getcwd())
    from kiln.distributed.launch import Channel, ShmChannel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    gloo = Channel(dist.group.WORLD)
    rows = {"gloo": measure(rank, gloo, steps), "shm": measure(rank, ShmChannel(
        spec, rank, gloo), steps)}
    if rank == 0:
        print(json.dumps(rows))
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    dist.destroy_process_group()


def measure(rank: int, channel, steps: int) -> dict | None:
    send_us, latency_us = [], []
    for _ in range(steps):
        if rank == 0:
            start = time.perf_counter()
            channel.send(("step", time.time_ns()))
            send_us.append((time.perf_counter() - start) * 1e6)
            time.sleep(0.0005)  # a step's GPU time: the worker is waiting in recv
        else:
            _, sent_ns = channel.recv()
            latency_us.append((time.time_ns() - sent_ns) / 1e3)
    results = [None, None]
    dist.all_gather_object(results, send_us or latency_us)
    if rank != 0:
        return None
    return {"steps": steps, "send_us_median": round(statistics.median(results[0]), 1),
            "send_us_p90": round(statistics.quantiles(results[0], n=10)[-1], 1),
            "latency_us_median": round(statistics.median(results[1]), 1),
            "latency_us_p90": round(statistics.quantiles(results[1], n=10)[-1], 1)}


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    from kiln.distributed.launch import ShmChannel, free_port

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default="control.json")
    args = ap.parse_args()
    spec = ShmChannel.create(2)
    mp.spawn(worker, args=(free_port(), args.steps, args.out, spec), nprocs=2)
    from multiprocessing import shared_memory
    shared_memory.SharedMemory(name=spec["name"]).unlink()
