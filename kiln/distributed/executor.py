"""Tensor parallelism on one node: rank 0 (the engine's process) schedules and broadcasts
each step; ranks 1..N-1 run in worker processes and compute their slice of every layer.

Collectives inside the model go over the default process group (NCCL on GPUs, gloo on
the CPU); step commands go over a separate gloo group as pickled objects. Only rank 0
keeps the KV block manager, the scheduler and the sampled tokens: a step's
SchedulerOutput carries every request's token and block ids, so workers need no state
but their weights and KV tensors.
"""

from __future__ import annotations

import atexit
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kiln.config import EngineConfig
from kiln.distributed.comm import set_tp_group
from kiln.distributed.mapping import Mapping


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int, device_type: str) -> tuple[torch.device, Any]:
    """Join the process group; returns this rank's device and the command group."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast (shared hosts)
    device = torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    set_tp_group(dist.group.WORLD)
    return device, dist.new_group(backend="gloo")


def _worker(rank: int, world: int, port: int, engine_dir: str, device_type: str) -> None:
    from kiln.build import load_engine_config
    from kiln.runtime.model_runner import ModelRunner

    device, commands = _join(rank, world, port, device_type)
    runner = ModelRunner(Path(engine_dir), load_engine_config(engine_dir), device,
                         Mapping(world, rank, world))
    try:
        while True:
            message: list[Any] = [None]
            dist.broadcast_object_list(message, src=0, group=commands)
            if message[0] is None:
                dist.barrier(group=commands)  # leave together: no peer left mid-talk
                break
            kind, payload = message[0]
            if kind == "kv":
                runner.allocate_kv_cache(payload)
            elif kind == "step":
                runner.launch(payload)  # its sampled tokens are rank 0's business
            elif kind == "logits":
                runner.forward_logits(payload)
    finally:
        dist.destroy_process_group()
    # A worker holds nothing worth tearing down; interpreter teardown with gloo's threads
    # alive can abort ("terminate called without an active exception").
    os._exit(0)


class TensorParallelRunner:
    """Looks like a ModelRunner to the engine; each call is mirrored on every rank."""

    def __init__(self, engine_dir: Path, engine: EngineConfig, device_type: str) -> None:
        from kiln.runtime.model_runner import ModelRunner

        world = engine.build.tp_size
        port = _free_port()
        context = mp.get_context("spawn")
        self.workers = [context.Process(target=_worker, daemon=True, args=(
            rank, world, port, str(engine_dir), device_type)) for rank in range(1, world)]
        for worker in self.workers:
            worker.start()
        device, self.commands = _join(0, world, port, device_type)
        self.runner = ModelRunner(engine_dir, engine, device, Mapping(world, 0, world))
        self.graphs = None  # graphs would need every rank to replay in lockstep: not yet
        atexit.register(self.close)

    def _send(self, message: Any) -> None:
        dist.broadcast_object_list([message], src=0, group=self.commands)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._send(("kv", num_blocks))
        self.runner.allocate_kv_cache(num_blocks)

    def launch(self, out, previous=None):
        self._send(("step", out))
        return self.runner.launch(out)

    def forward_logits(self, out) -> torch.Tensor:
        self._send(("logits", out))
        return self.runner.forward_logits(out)

    def capture_graphs(self, max_batch_size: int) -> None:
        pass

    def close(self) -> None:
        if not self.workers:
            return
        self._send(None)
        dist.barrier(group=self.commands)
        for worker in self.workers:
            worker.join(timeout=30)
        self.workers = []
        set_tp_group(None)
        dist.destroy_process_group()

    def __getattr__(self, name: str) -> Any:  # block_size, kv_bytes_per_block, model, ...
        return getattr(self.__dict__["runner"], name)
