"""Starting the ranks of a multi-rank engine, and telling which one died.

Two ways in: under torchrun (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT, e.g. mpirun or srun wrappers), every rank runs the same
command and joins through the environment; without a launcher, rank 0 (the user's
process) spawns ranks 1..N-1 itself on this node. Either way the model's collectives go
over NCCL (GPUs) or gloo (CPU), and a gloo group carries rank 0's step messages (the
channels: kiln.distributed.channels; where the ranks meet: kiln.distributed.rendezvous).
"""

from __future__ import annotations

import ctypes
import os
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

from kiln.distributed import rendezvous
from kiln.distributed.channels import MESSAGE_BYTES, Channel, ShmChannel  # noqa: F401 (were here)
from kiln.distributed.comm import set_tp_group
from kiln.errors import KilnError

# Exit code of a process multiprocessing spawned that, importing the user's main module
# again (the spawn start method does), reached code that starts a multi-rank engine: a
# script without the `if __name__ == "__main__":` guard.
MAIN_REIMPORTED = 86
# Exit code of a worker kiln spawned that stopped because another rank was lost (its
# collective failed): rank 0 names the rank that died first, not this one.
PEER_LOST = 87


class RankDied(KilnError):
    """A rank of the engine died (or was lost) and the engine cannot start or go on."""

    exit_code = 1


class PeerLost(RankDied):
    """This rank's collective failed because another rank's process is gone."""


class WorkerError(KilnError):
    """A worker kiln spawned stopped on a KilnError of its own (a mistake the user can
    fix, e.g. a damaged rank file): its message, for rank 0 to raise."""


@dataclass
class RankContext:
    rank: int
    world_size: int
    device: torch.device
    commands: Any  # gloo process group for step messages
    launcher: str  # "torchrun" or "kiln"
    channel_spec: Any = None  # shared-memory channel to the workers kiln spawned
    channel: Any = None  # this rank's ShmChannel, attached before it joined
    excepthook: Any = None  # sys.excepthook before joining (torch prefixes it with [rankN])


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
    """(rank, world size, local rank) when a launcher (torchrun, ...) started us; values
    that no launcher sets (one of RANK / WORLD_SIZE alone, not a number, a rank outside
    the world) are one KilnError, not a ValueError's traceback or a wait for ranks that
    cannot come."""
    given = [name for name in ("RANK", "WORLD_SIZE") if name in os.environ]
    if not given:
        return None
    if len(given) == 1:
        other = "WORLD_SIZE" if given[0] == "RANK" else "RANK"
        raise KilnError(f"{given[0]} is set but {other} is not: a launcher sets both (and "
                        "MASTER_ADDR / MASTER_PORT); set both for every rank, or neither")
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if world < 1:
        raise KilnError(f"WORLD_SIZE={world} must be the number of ranks, at least 1")
    if not 0 <= rank < world:
        raise KilnError(f"RANK={rank} is outside WORLD_SIZE={world}: ranks are numbered "
                        f"0 to {world - 1}")
    if local_rank < 0:
        raise KilnError(f"LOCAL_RANK={local_rank} must be 0 or more (this rank's GPU on "
                        "its node)")
    return rank, world, local_rank


def world_mismatch(engine_dir: Any, world: int, launched: int) -> str:
    """The line for an engine of `world` ranks under a launcher that started `launched`."""
    ranks, procs = ("rank", "process") if world == 1 else ("ranks", "processes")
    return (f"{engine_dir} is built for {world} {ranks} (tp x pp), but the launcher started "
            f"{launched} (WORLD_SIZE); launch {world} {procs}")


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw.strip())
    except ValueError:
        raise KilnError(f"{name}={raw!r} is not a whole number (a launcher sets RANK, "
                        "WORLD_SIZE and LOCAL_RANK to numbers)") from None


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
    if init_method == "env://" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        where: dict[str, Any] = {"init_method": init_method}  # torchrun's agents met already
    else:  # any other launcher, or kiln's own workers: rank 0 hosts the store
        host, port = rendezvous.address(init_method)
        where = {"store": rendezvous.store(host, port, rank, world, rendezvous.join_timeout(),
                                           quiet=launcher == "kiln")}
    excepthook = sys.excepthook
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank,
                            world_size=world, timeout=timedelta(minutes=10), **where)
    tp_size = tp_size or world
    if tp_size == world:
        set_tp_group(dist.group.WORLD)
    else:  # every rank creates every stage's group, in the same order
        for start in range(0, world, tp_size):
            group = dist.new_group(list(range(start, start + tp_size)))
            if start <= rank < start + tp_size:
                set_tp_group(group)
    commands = dist.new_group(backend="gloo", timeout=timedelta(days=1))
    return RankContext(rank, world, device, commands, launcher, excepthook=excepthook)


def restore_excepthook(ctx: RankContext | None) -> None:
    """Put back the sys.excepthook of before the join: init_process_group wraps it in one
    that prefixes "[rankN]: ", and a process that ran several engines stacked them."""
    if ctx is not None and ctx.excepthook is not None:
        sys.excepthook, ctx.excepthook = ctx.excepthook, None


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


def die_with_parent(parent: int | None = None, death_signal: bool = True) -> None:
    """Linux: the kernel kills this process when its parent dies (no orphans). Given the
    parent's pid, a parent already gone by now ends this process too. The kernel's signal
    comes when the parent's *thread* that started this process ends: a parent that did
    so from another thread than its main one passes death_signal=False, and a thread of
    this process watches for being orphaned instead (within half a second)."""
    if death_signal:
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if parent is not None and os.getppid() != parent:
        os._exit(1)
    if parent is not None and not death_signal:
        def orphaned() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=orphaned, daemon=True, name="kiln-parent-watch").start()


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
    how = f"exit code {exitcode}"
    if exitcode is not None and exitcode < 0:
        try:
            how = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return f"worker rank {rank} died ({how}); the engine cannot " \
           f"{'start' if starting else 'continue'}"


class Deaths:
    """The first death among the workers kiln spawned, decided once (the workers rank 0
    kills afterwards do not count): a worker that stopped on a lost peer (PEER_LOST) is
    named only when no other died, and one killed by a signal comes before one that
    exited. A worker that reported its error (ShmChannel.report) is named with it."""

    def __init__(self, workers: list[Any], channel: ShmChannel | None = None) -> None:
        self.workers, self.channel = workers, channel
        self.starting = True  # "the engine cannot start", until it has
        self.first: KilnError | None = None
        self._lock = threading.Lock()

    def find(self, wait: float = 0.0, settle: float = 0.5) -> KilnError | None:
        """The first death as the error to raise, waiting up to `wait` seconds for one
        (an error can reach rank 0 before the process is reaped); None if none died."""
        with self._lock:
            if self.first is None:
                self.first = self._find(list(self.workers), wait, settle)
            return self.first

    def _find(self, workers: list[Any], wait: float, settle: float) -> KilnError | None:
        deadline, seen = time.monotonic() + wait, None
        while True:
            dead = [(rank, w.exitcode) for rank, w in enumerate(workers, start=1)
                    if not w.is_alive()]
            causes = [d for d in dead if d[1] != PEER_LOST]
            now = time.monotonic()
            if causes or (seen is not None and now - seen > settle):
                rank, code = min(causes or dead, key=lambda d: (d[1] is None or d[1] >= 0))
                return self.error(rank, code)
            if dead:
                seen = seen or now
            elif now > deadline:
                return None
            time.sleep(0.02)

    def error(self, rank: int, exitcode: int | None) -> KilnError:
        reported = self.channel.reported(rank) if self.channel is not None else None
        if reported:
            return WorkerError(f"worker rank {rank}: {reported}")
        return RankDied(death_message(rank, exitcode, self.starting))


def await_started(deaths: Deaths, started: Any, timeout: float = 600.0) -> None:
    """Wait until every worker released the `started` semaphore (it is about to join the
    process group, where a rank that died would keep rank 0 waiting for minutes); the
    error of the first that died before that."""
    deadline, pending = time.monotonic() + timeout, len(deaths.workers)
    while pending:
        if started.acquire(timeout=0.05):
            pending -= 1
            continue
        if not all(w.is_alive() for w in deaths.workers):
            death = deaths.find()
            if death is not None:
                raise death
        if time.monotonic() > deadline:
            raise RankDied(f"{pending} worker rank(s) did not start in {timeout:.0f} s")


def watch(deaths: Deaths, on_death: Callable[[KilnError], None],
          interval: float = 0.2) -> None:
    """A thread that calls on_death(error) once when a worker process exits."""
    workers = deaths.workers  # cleared in place when the engine shuts down: stop watching

    def loop() -> None:
        while workers:
            if not all(w.is_alive() for w in list(workers)):
                death = deaths.find()
                if workers and death is not None:  # not a shutdown in progress
                    on_death(death)
                return
            time.sleep(interval)

    threading.Thread(target=loop, daemon=True, name="kiln-worker-watch").start()


# What a collective raises when a peer rank's process is gone (gloo, NCCL)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "ncclRemoteError", "NCCL communicator was aborted")


def peer_lost(error: BaseException | None, rank: int, starting: bool = False) -> str | None:
    """One line for a collective's error that says a peer rank is gone; None for others."""
    if error is None:
        return None
    if isinstance(error, PeerLost):
        return f"kiln: {error}"
    text = str(error).strip()
    if not (isinstance(error, dist.DistNetworkError) or any(s in text for s in _PEER_GONE)):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else "")
    first = first.split(". ")[0]  # gloo goes on with advice
    return (f"kiln: rank {rank} lost a peer rank ({first[:160] or type(error).__name__}); "
            f"the engine cannot {'start' if starting else 'continue'}")


def fail(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(1)
