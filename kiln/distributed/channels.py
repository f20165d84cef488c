"""The channels rank 0 sends its step messages on: a gloo broadcast to ranks a launcher
started, a ring of shared-memory slots to the workers kiln spawned on this node (which
also carries a worker's last words back: the one-line error it stopped on)."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# Fixed size of one step message: a step with no new requests fits in one broadcast.
MESSAGE_BYTES = 4096


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

    After the ring, each worker has a small area of its own where it leaves the one-line
    error it stops on (`report`), for rank 0 to say instead of "exit code 1" (`reported`).
    """

    SLOTS = 8
    SLOT_BYTES = 1 << 20
    REPORT_BYTES = 4096

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
        shm = shared_memory.SharedMemory(create=True, size=cls.SLOTS * cls.SLOT_BYTES +
                                         world * cls.REPORT_BYTES)
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

    def _report_area(self, rank: int) -> int:
        return self.SLOTS * self.SLOT_BYTES + rank * self.REPORT_BYTES

    def report(self, message: str) -> None:
        """Leave this worker's last words (a one-line error) for rank 0."""
        data = message.encode("utf-8", "replace")[: self.REPORT_BYTES - 8]
        at = self._report_area(self.rank)
        if at + self.REPORT_BYTES <= len(self.shm.buf):
            self.shm.buf[at + 8:at + 8 + len(data)] = data
            self.shm.buf[at:at + 8] = len(data).to_bytes(8, "little")

    def reported(self, rank: int) -> str | None:
        """What worker `rank` reported before it stopped (rank 0), if anything."""
        at = self._report_area(rank)
        if self.shm.buf is None or at + self.REPORT_BYTES > len(self.shm.buf):
            return None
        size = int.from_bytes(self.shm.buf[at:at + 8], "little")
        if not 0 < size <= self.REPORT_BYTES - 8:
            return None
        return bytes(self.shm.buf[at + 8:at + 8 + size]).decode("utf-8", "replace")

    @staticmethod
    def release_names(spec: dict) -> None:
        """Unlink the names of the spec's memory and semaphores once every worker opened
        them (or none will): the objects live on in the processes that hold them, and
        nothing is left to clean up however the processes end (no "leaked semaphore
        objects" warning from multiprocessing's resource tracker after a kill)."""
        from multiprocessing import resource_tracker, shared_memory, synchronize, util

        if spec.get("released"):
            return
        spec["released"] = True
        try:
            shared_memory.SharedMemory(name=spec["name"]).unlink()
        except OSError:
            pass
        names = set()
        for sem in [*spec["ready"], *spec["free"], spec["started"]]:
            name = getattr(sem._semlock, "name", None)  # noqa: SLF001
            if name is None:
                continue
            names.add(name)
            try:
                synchronize.sem_unlink(name)
            except OSError:
                pass
            resource_tracker.unregister(name, "semaphore")
        for finalizer in list(util._finalizer_registry.values()):  # noqa: SLF001
            if getattr(finalizer, "_callback", None) is synchronize.SemLock._cleanup and \
                    finalizer._args[0] in names:  # noqa: SLF001
                finalizer.cancel()  # its unlink would fail now

    def close(self, unlink: bool = False, keep_mapping: bool = False) -> None:
        """Unlink the name (the creator, once every worker attached) and/or unmap."""
        if unlink:
            try:
                self.shm.unlink()
            except OSError:  # release_names did
                pass
        if not keep_mapping:
            self.shm.close()
