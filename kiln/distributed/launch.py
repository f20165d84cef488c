"""Starting the ranks of a multi-rank engine, and the channel rank 0 talks to them on.

Two ways in: under torchrun (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT, e.g. mpirun or srun wrappers), every rank runs the same
command and joins through the environment; without a launcher, rank 0 (the user's
process) spawns ranks 1..N-1 itself on this node. Either way the model's collectives go
over NCCL (GPUs) or gloo (CPU), and a gloo group carries rank 0's step messages.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kiln.distributed.comm import set_tp_group
from kiln.errors import KilnError

# Fixed size of one step message: a step with no new requests fits in one broadcast.
MESSAGE_BYTES = 4096
# Exit code of a process multiprocessing spawned that, importing the user's main module
# again (the spawn start method does), reached code that starts a multi-rank engine: a
# script without the `if __name__ == "__main__":` guard.
MAIN_REIMPORTED = 86


class RankDied(KilnError):
    """A rank kiln spawned died before the engine started."""

    exit_code = 1


@dataclass
class RankContext:
    rank: int
    world_size: int
    device: torch.device
    commands: Any  # gloo process group for step messages
    launcher: str  # "torchrun" or "kiln"
    channel_spec: Any = None  # shared-memory channel to the workers kiln spawned
    channel: Any = None  # a worker's ShmChannel, attached before it joined


def channel(ctx: RankContext, alive: Callable[[], bool] | None = None) -> Any:
    """The step-message channel of this rank: shared memory to workers kiln spawned on
    this node, else messages over the gloo group."""
    gloo = Channel(ctx.commands)
    if ctx.channel_spec is None:
        return gloo
    shm = ctx.channel or ShmChannel(ctx.channel_spec, ctx.rank, gloo, alive)
    shm.fallback, shm.alive = gloo, alive
    return shm


def launcher_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when a launcher (torchrun, ...) started us."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def join(rank: int, world: int, local_rank: int, device_type: str,
         init_method: str = "env://", launcher: str = "torchrun",
         tp_size: int | None = None) -> RankContext:
    """Join the process group, make each pipeline stage's tensor-parallel group (this
    rank's becomes the layers' collective group), and a gloo group for step messages."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast (shared hosts)
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    device = torch.device("cpu")
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise KilnError(f"rank {rank} wants GPU {local_rank}, but this node has "
                            f"{torch.cuda.device_count()}; start at most that many ranks per node")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if device_type == "cpu" and launcher == "kiln":  # the ranks kiln spawned on this node
        threads = cpu_threads_per_rank(world)
        if threads:
            torch.set_num_threads(threads)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                            init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(minutes=10))
    tp_size = tp_size or world
    if tp_size == world:
        set_tp_group(dist.group.WORLD)
    else:  # every rank creates every stage's group, in the same order
        for start in range(0, world, tp_size):
            group = dist.new_group(list(range(start, start + tp_size)))
            if start <= rank < start + tp_size:
                set_tp_group(group)
    commands = dist.new_group(backend="gloo", timeout=timedelta(days=1))
    return RankContext(rank, world, device, commands, launcher)


def cpu_threads_per_rank(local_ranks: int) -> int | None:
    """Intra-op threads for each of local_ranks CPU ranks kiln spawned on this node: its
    cores split between them (None when OMP_NUM_THREADS says). Left at torch's default,
    every rank runs a thread per core: three ranks on two cores ran 5.4x slower (0.7 tok/s,
    3.8 split). Launchers set their own (torchrun: OMP_NUM_THREADS=1 per process)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1
    return max(1, cores // max(1, local_ranks))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies (no orphans)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(world: int, target: Callable[..., None], args: tuple) -> list[Any]:
    """Start ranks 1..world-1 as processes running target(rank, *args)."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    workers = [context.Process(target=target, args=(rank, *args), daemon=True)
               for rank in range(1, world)]
    for worker in workers:
        worker.start()
    return workers


def reimporting_main() -> bool:
    """Whether this process is a spawned child still importing the parent's main module
    (where starting processes fails: multiprocessing's "bootstrapping phase" error)."""
    from multiprocessing import process

    return bool(getattr(process.current_process(), "_inheriting", False))


def death_message(rank: int, exitcode: int | None, starting: bool = False) -> str:
    """What to say when worker `rank` exited with `exitcode` (no "kiln: " prefix)."""
    if exitcode == MAIN_REIMPORTED:
        main = getattr(sys.modules.get("__main__"), "__file__", None) or "the main module"
        return (f"worker rank {rank} died as it started (exit code {exitcode}): it ran the "
                f"top level of {main} again, which starts this multi-rank engine again; "
                "start it (LLM(...)) under `if __name__ == \"__main__\":`")
    return (f"worker rank {rank} died (exit code {exitcode}); the engine cannot "
            f"{'start' if starting else 'continue'}")


def await_started(workers: list[Any], started: Any, timeout: float = 600.0) -> None:
    """Wait until every worker released the `started` semaphore (it is about to join the
    process group, where a rank that died would keep rank 0 waiting for minutes); a
    RankDied for the first found dead before that."""
    deadline, pending = time.monotonic() + timeout, len(workers)
    while pending:
        if started.acquire(timeout=0.05):
            pending -= 1
            continue
        for rank, worker in enumerate(workers, start=1):
            if not worker.is_alive():
                raise RankDied(death_message(rank, worker.exitcode, starting=True))
        if time.monotonic() > deadline:
            raise RankDied(f"{pending} worker rank(s) did not start in {timeout:.0f} s")


def watch(workers: list[Any], on_death: Callable[[str], None], interval: float = 0.2) -> None:
    """A thread that calls on_death(message) once when any worker process exits."""
    def loop() -> None:
        while workers:
            for rank, worker in enumerate(list(workers), start=1):
                if not worker.is_alive():
                    if workers:  # not a shutdown in progress
                        on_death(f"kiln: {death_message(rank, worker.exitcode)}")
                    return
            time.sleep(interval)

    threading.Thread(target=loop, daemon=True, name="kiln-worker-watch").start()


# What a collective raises when a peer rank's process is gone (gloo, NCCL)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "ncclRemoteError", "NCCL communicator was aborted")


def peer_lost(error: BaseException | None, rank: int) -> str | None:
    """One line for a collective's error that says a peer rank is gone; None for others."""
    if error is None:
        return None
    text = str(error).strip()
    if not (isinstance(error, dist.DistNetworkError) or any(s in text for s in _PEER_GONE)):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else "")
    first = first.split(". ")[0]  # gloo goes on with advice
    return (f"kiln: rank {rank} lost a peer rank ({first[:160] or type(error).__name__}); "
            "the engine cannot continue")


def fail(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


class Channel:
    """Rank 0 -> all ranks, pickled messages over the gloo group: one fixed-size
    broadcast when the message fits (the common case), a second for the rest."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.buffer = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        head = len(data).to_bytes(8, "little") + data[: MESSAGE_BYTES - 8]
        self.buffer[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        dist.broadcast(self.buffer, src=0, group=self.group)
        if len(data) > MESSAGE_BYTES - 8:
            rest = torch.frombuffer(bytearray(data[MESSAGE_BYTES - 8:]), dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)

    def recv(self) -> Any:
        dist.broadcast(self.buffer, src=0, group=self.group)
        raw = self.buffer.numpy().tobytes()
        size = int.from_bytes(raw[:8], "little")
        data = raw[8: 8 + min(size, MESSAGE_BYTES - 8)]
        if size > MESSAGE_BYTES - 8:
            rest = torch.empty(size - (MESSAGE_BYTES - 8), dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)
            data += rest.numpy().tobytes()
        return pickle.loads(data)


class ShmChannel:
    """Rank 0 -> the workers it spawned on this node: pickled messages in a ring of
    shared-memory slots, with a pair of semaphores per worker (message ready, slot free).

    A send costs a few microseconds and wakes each worker directly, where a gloo
    broadcast costs ~120-280 us to send and ~150 us to arrive on a 2-core machine
    (`benchmarks/control_message.py`). A message larger than a slot is announced in its
    slot and follows over the gloo channel. The semaphores also order the memory: what
    rank 0 wrote before releasing "ready" is what the worker reads after acquiring it.
    """

    SLOTS = 8
    SLOT_BYTES = 1 << 20

    def __init__(self, spec: dict, rank: int, fallback: Channel | None,
                 alive: Callable[[], bool] | None = None) -> None:
        from multiprocessing import resource_tracker, shared_memory

        self.rank, self.fallback, self.alive = rank, fallback, alive
        self.shm = shared_memory.SharedMemory(name=spec["name"])
        if rank != 0:  # the creator unlinks it; an attached process must not (bpo-39959)
            resource_tracker.unregister(self.shm._name, "shared_memory")  # noqa: SLF001
        self.ready, self.free = spec["ready"], spec["free"]
        self.seq = 0

    @classmethod
    def create(cls, world: int) -> dict:
        """The spec a worker attaches with (passed to it as a spawn argument)."""
        import multiprocessing as mp
        from multiprocessing import shared_memory

        context = mp.get_context("spawn")
        shm = shared_memory.SharedMemory(create=True, size=cls.SLOTS * cls.SLOT_BYTES)
        spec = {"name": shm.name, "ready": [context.Semaphore(0) for _ in range(world - 1)],
                "free": [context.Semaphore(cls.SLOTS) for _ in range(world - 1)],
                "started": context.Semaphore(0)}  # a worker about to join (await_started)
        shm.close()
        return spec

    def _slot(self) -> int:
        return (self.seq % self.SLOTS) * self.SLOT_BYTES

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for free in self.free:
            while not free.acquire(timeout=1.0):  # the ring is full: a worker is behind
                if self.alive is not None and not self.alive():
                    raise RuntimeError("a worker stopped reading step messages")
        at, buf = self._slot(), self.shm.buf
        inline = len(data) <= self.SLOT_BYTES - 8
        buf[at:at + 8] = (len(data) if inline else -1).to_bytes(8, "little", signed=True)
        if inline:
            buf[at + 8:at + 8 + len(data)] = data
        for ready in self.ready:
            ready.release()
        self.seq += 1
        if not inline:
            assert self.fallback is not None
            self.fallback.send(message)

    def recv(self) -> Any:
        ready, free = self.ready[self.rank - 1], self.free[self.rank - 1]
        ready.acquire()
        at, buf = self._slot(), self.shm.buf
        size = int.from_bytes(buf[at:at + 8], "little", signed=True)
        data = bytes(buf[at + 8:at + 8 + size]) if size >= 0 else None
        free.release()
        self.seq += 1
        if data is None:
            assert self.fallback is not None
            return self.fallback.recv()
        return pickle.loads(data)

    @staticmethod
    def discard(spec: dict) -> None:
        """Remove the memory of a spec no channel was made of (the ranks did not start)."""
        from multiprocessing import shared_memory

        try:
            shared_memory.SharedMemory(name=spec["name"]).unlink()
        except OSError:
            pass

    def close(self, unlink: bool = False, keep_mapping: bool = False) -> None:
        """Unlink the name (the creator, once every worker attached) and/or unmap."""
        if unlink:
            self.shm.unlink()
        if not keep_mapping:
            self.shm.close()
