"""Multi-rank engines, SPMD: every rank holds the whole engine (scheduler, KV block
manager, output processing) and a model runner for its slice, and applies the same calls
in the same order. Rank 0 takes the user's calls; the ones that change engine state
(add, abort, step, logits, close) are sent to the other ranks just before rank 0 applies
them, so a step's message is usually just "step" (new requests ride along). Sampled
tokens are broadcast from rank 0 inside the step (model_runner), so every rank's host
state stays identical without trusting kernels to be bitwise reproducible across ranks.
Each rank keeps CUDA graphs and overlap scheduling: nothing is pickled per request and
nothing waits on a per-step round trip to rank 0.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kiln.distributed import launch
from kiln.distributed.comm import set_tp_group
from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.runtime.engine import LLMEngine, RuntimeConfig

log = logging.getLogger(__name__)


class Mirror:
    """Rank 0's end: queues state-changing calls and sends them with the next one that
    needs the workers (step, logits, close)."""

    PING_EVERY = 1.0  # seconds between two pings of an idle engine's launched ranks

    def __init__(self, ctx: launch.RankContext, workers: list[Any],
                 threads_before: int | None = None, deaths: launch.Deaths | None = None,
                 engine: LLMEngine | None = None) -> None:
        self.ctx = ctx
        self.workers = workers
        self.threads_before = threads_before  # this process's CPU threads before join
        self.deaths = deaths or launch.Deaths(workers)
        self.engine = engine
        self.channel = launch.channel(ctx, alive=lambda: all(w.is_alive() for w in workers))
        self.pending: list[tuple] = []
        self.closed = False
        # A call left half-way (Ctrl-C) or failed on a lost rank: the other ranks may be
        # waiting in its collectives, so close() tells them nothing and waits for nothing.
        self.broken = False
        self.last_sent = time.monotonic()

    def record(self, event: tuple) -> None:
        self.pending.append(event)

    def send(self, event: tuple) -> None:
        events, self.pending = [*self.pending, event], []
        self.channel.send(events)
        self.last_sent = time.monotonic()

    def call(self, event: tuple, fn: Callable[[], Any]) -> Any:
        """Send `event` to the other ranks, then run fn() (which takes part in the same
        collectives as they do); a lost rank fails the engine with one line."""
        try:
            self.send(event)
            return fn()
        except Exception as e:
            # A KilnError is the step's own (every rank's); others may come of a lost rank
            message = self.lost_rank(wait=0.0 if isinstance(e, KilnError) else 2.0, error=e)
            if message is None:
                raise
            self.broken = True
            assert self.engine is not None
            self.engine.fail(message)  # exits, unless a server keeps answering 503
            raise KilnError(message) from None
        except BaseException:  # Ctrl-C in the middle of the call
            self.broken = True
            raise

    @property
    def ping_every(self) -> float | None:
        """Seconds between pings of the idle engine's ranks (None: the workers are ours)."""
        return None if self.ctx.launcher == "kiln" else self.PING_EVERY

    def ping(self) -> None:
        """An idle engine's ranks that a launcher started hear from rank 0 every second,
        so that one whose process is gone is noticed now (/health turns 503), not at the
        next request. (A watcher thread sees the workers kiln spawned die.)"""
        if self.workers or self.closed or self.broken or self.engine is None or \
                self.engine.failure is not None or \
                time.monotonic() - self.last_sent < self.PING_EVERY:
            return
        self.call(("ping",), lambda: None)

    def lost_rank(self, wait: float = 2.0, error: BaseException | None = None) -> str | None:
        """Why a collective failed, if a worker process is gone (waiting briefly: the
        error can reach us before the process is reaped); under a launcher, whose ranks
        are no processes of ours, if the error says a peer is gone."""
        if not self.workers:
            return launch.peer_lost(error, self.ctx.rank, self.deaths.starting)
        death = self.deaths.find(wait)
        return None if death is None else f"kiln: {death}"

    def close(self, exiting: bool = False) -> None:
        """Stop the workers. At interpreter exit, once the workers kiln spawned are gone,
        the process group is left to the OS: NCCL's teardown can block without peers.
        After a broken call the ranks are not told: the workers kiln spawned are stopped
        (they may wait in that call's collectives), and nothing waits on a peer."""
        if self.closed:
            return
        self.closed = True
        workers = list(self.workers)
        self.workers.clear()  # in place: the watcher holds this list and stops watching
        broken = self.broken or self.engine is not None and self.engine.failure is not None
        if not broken:
            try:
                self.send(("close",))
                if not workers:  # launched ranks: all at close before the groups go
                    dist.barrier(group=self.ctx.commands, async_op=True).wait(
                        timedelta(seconds=30))
            except Exception:  # a rank already gone: nothing left to tell
                broken = True
        set_tp_group(None)
        _stop(workers, timeout=0.0 if broken else 30.0)
        # Under a launcher the peers tear their groups down now too (launched_worker), so
        # rank 0 does the same rather than leave gloo's threads to interpreter teardown;
        # so does a broken engine's (whose groups hold pairs to lost ranks).
        if not exiting or broken or self.ctx.launcher != "kiln":
            _destroy_process_group(timeout=2.0 if broken else 10.0)
        launch.restore_excepthook(self.ctx)
        if isinstance(self.channel, launch.ShmChannel):
            self.channel.close()
        if self.threads_before is not None:  # join split the cores between the ranks
            torch.set_num_threads(self.threads_before)


def _stop(workers: list[Any], timeout: float) -> None:
    """Wait up to `timeout` s for the workers to exit, then terminate (kill) the rest."""
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.join(timeout=max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join(timeout=2.0)
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=2.0)


def failed(engine: LLMEngine, message: str) -> None:
    """A rank of `engine` died (LLMEngine.fail): stop the workers and say so once; exit,
    unless a server keeps answering (503) or the engine is still loading (then
    LLMEngine() raises it, see `starting`)."""
    mirror = engine.mirror
    for worker in mirror.workers if mirror is not None else []:
        worker.kill()
    if mirror is not None and mirror.deaths.starting:
        mirror.broken = True
    elif engine.exit_on_failure:
        launch.fail(message)  # the one line, then exit
    else:
        log.error(message)
    abort_collectives()  # a step blocked on the lost rank fails instead of hanging


@contextlib.contextmanager
def starting(engine: LLMEngine) -> Iterator[None]:
    """Around the loading of a rank of a multi-rank engine, after the ranks joined. A rank
    lost meanwhile (a worker that could not read its weights, a peer's process gone) is
    one error, not a collective's traceback: the worker's own KilnError, RankDied or
    PeerLost. Rank 0 then stops its workers and frees the process group."""
    ctx, mirror = engine.rank_context, engine.mirror
    if ctx is None:
        # A one-rank engine under a launcher of several processes: each ran it whole
        if (env := launch.launcher_rank()) is not None and env[1] != 1:
            raise KilnError(launch.world_mismatch(engine.engine_dir, 1, env[1]))
        yield
        return
    try:
        yield
        if engine.failure is not None:  # a worker died after rank 0's last collective
            raise KilnError(engine.failure)
    except BaseException as e:
        error = _startup_error(engine, e)
        if mirror is not None:
            mirror.broken = True
            mirror.close()  # the workers stopped, the group freed: LLM() may be called again
        if error is None:
            raise
        raise error from None
    if mirror is not None:
        mirror.deaths.starting = False


def _startup_error(engine: LLMEngine, error: BaseException) -> KilnError | None:
    """The error a failure while loading stands for, when a rank was lost."""
    mirror, rank = engine.mirror, engine.rank_context.rank
    lost = launch.peer_lost(error, rank, starting=True)
    if mirror is not None and mirror.workers:
        looks_lost = lost is not None or engine.failure is not None
        return mirror.deaths.find(wait=2.0 if looks_lost else 0.0)
    if lost is None:
        return None
    return launch.PeerLost(lost.removeprefix("kiln: "))


def start(engine: LLMEngine, world: int, device_type: str) -> tuple[launch.RankContext, Mirror
                                                                     | None]:
    """Join (or create) this engine's ranks. Returns the rank's context and, on rank 0,
    the mirror; a rank other than 0 under a launcher runs the worker loop and exits."""
    env = launch.launcher_rank()
    if env is not None:
        rank, env_world, local_rank = env
        if env_world != world:
            raise KilnError(launch.world_mismatch(engine.engine_dir, world, env_world))
        threads = torch.get_num_threads()
        ctx = launch.join(rank, world, local_rank, device_type,
                          tp_size=engine.config.build.tp_size)
        if rank != 0:
            return ctx, None
        mirror = Mirror(ctx, [], threads, engine=engine)
        atexit.register(mirror.close, exiting=True)
        return ctx, mirror
    if dist.is_initialized():
        raise KilnError("this process still holds the process group of an earlier "
                        "multi-GPU engine that could not be released; start the new engine "
                        "in a new process")
    if launch.reimporting_main():  # a spawned worker re-running an unguarded script
        raise SystemExit(launch.MAIN_REIMPORTED)  # rank 0 says what to do (death_message)
    port = launch.free_port()
    tp = engine.config.build.tp_size
    spec = launch.ShmChannel.create(world)
    shm = launch.ShmChannel(spec, 0, None)  # where the workers leave their last words
    # The kernel's parent-death signal follows the thread that starts the workers: an
    # engine loaded from a thread that then ends (a pool's) would lose them with it.
    main_thread = threading.current_thread() is threading.main_thread()
    workers = launch.spawn(world, _spawned_worker, (world, tp, port, str(engine.engine_dir),
                                                    engine.runtime, spec, main_thread))
    deaths = launch.Deaths(workers, shm)
    threads = torch.get_num_threads()
    joined = False

    def on_death(error: KilnError) -> None:
        if not joined:  # nothing interrupts the rendezvous: the one line, and exit
            launch.fail(f"kiln: {error}")
        engine.fail(f"kiln: {error}")

    try:
        launch.await_started(deaths, spec["started"])  # a worker that died says so now
        # Every worker opened the ring and its semaphores: their names can go now, so
        # nothing is left in /dev/shm (nor for multiprocessing's resource tracker to
        # warn about) however the processes end.
        launch.ShmChannel.release_names(spec)
        launch.watch(deaths, on_death)
        ctx = launch.join(0, world, 0, device_type, f"tcp://127.0.0.1:{port}", "kiln", tp)
    except BaseException:
        stopped = list(workers)
        workers.clear()  # the watcher stops watching
        for worker in stopped:
            worker.kill()
        launch.ShmChannel.release_names(spec)
        shm.close()
        torch.set_num_threads(threads)  # join split the cores for the ranks that failed
        raise
    ctx.channel_spec, ctx.channel = spec, shm
    engine.mirror = mirror = Mirror(ctx, workers, threads, deaths, engine)
    joined = True
    atexit.register(mirror.close, exiting=True)
    return ctx, mirror


def _destroy_process_group(timeout: float = 10.0) -> None:
    """Tear the process group down in a thread, giving up after `timeout`: NCCL's
    teardown has blocked on two H200s (destroy_process_group past 15 s), and a stuck close
    is worse than a leaked communicator. NCCL groups are aborted (ncclCommAbort waits for
    no peer; nothing is in flight at close), gloo groups destroyed; both unregister the
    groups, so this process can start another multi-rank engine."""
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    done = threading.Event()

    def teardown() -> None:
        try:
            if nccl:
                abort_collectives()
            else:
                dist.destroy_process_group()
        except Exception:
            log.debug("tearing the process group down failed", exc_info=True)
        done.set()

    threading.Thread(target=teardown, daemon=True, name="kiln-pg-teardown").start()
    if not done.wait(timeout):
        log.warning("the process group did not shut down in %.0f s; leaving it", timeout)


def abort_collectives() -> None:
    """Make collectives that wait on a lost rank fail now rather than at their timeout."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        if abort is not None and dist.is_initialized():
            abort()
    except Exception:  # best effort: the caller has already recorded the failure
        log.debug("aborting the process group failed", exc_info=True)


def _spawned_worker(rank: int, world: int, tp_size: int, port: int, engine_dir: str,
                    runtime: RuntimeConfig, channel_spec: dict | None = None,
                    death_signal: bool = True) -> None:
    from kiln.runtime.engine import LLMEngine

    launch.die_with_parent(getattr(multiprocessing.parent_process(), "pid", None),
                           death_signal)
    # A Ctrl-C in a terminal reaches every process of its group: rank 0 decides, and
    # stops the workers (they may be inside the collectives of the step it left).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    device_type = "cuda" if runtime.device.startswith("cuda") or (
        runtime.device == "auto" and _cuda()) else "cpu"
    channel = launch.ShmChannel(channel_spec, rank, None) if channel_spec else None
    if channel_spec:
        channel_spec["started"].release()  # rank 0 stops watching for a death at start
    try:
        ctx = launch.join(rank, world, rank, device_type, f"tcp://127.0.0.1:{port}", "kiln",
                          tp_size)
        ctx.channel_spec = channel_spec
        ctx.channel = channel  # attached before joining: rank 0 unlinks the name after
        engine = LLMEngine(Path(engine_dir), runtime, rank_context=ctx)
        run_worker(engine)
    except Exception as e:
        if launch.peer_lost(e, rank) is not None:  # another rank died first: rank 0 names it
            os._exit(launch.PEER_LOST)
        if isinstance(e, KilnError) and channel is not None:
            channel.report(str(e))  # rank 0 raises it: one line, as rank 0's own would be
        elif isinstance(e, KilnError):
            print(f"kiln: error: worker rank {rank}: {e}", file=sys.stderr, flush=True)
        else:
            log.exception("worker rank %d failed", rank)
            sys.stderr.flush()
        os._exit(1)
    # Interpreter teardown with gloo's threads alive can abort; nothing is left to free.
    os._exit(0)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def launched_worker(engine: LLMEngine) -> None:
    """A rank other than 0 that a launcher (torchrun) started: replay rank 0's calls, then
    exit; one line, exit code 1, when a peer rank is gone."""
    try:
        run_worker(engine)
    except Exception as e:
        message = launch.peer_lost(e, engine.rank_context.rank)
        if message is None:
            raise
        launch.fail(message)
    sys.stdout.flush()
    os._exit(0)


def run_worker(engine: LLMEngine) -> None:
    """Replay rank 0's calls until it closes the engine."""
    channel = launch.channel(engine.rank_context)
    while True:
        for event in channel.recv():
            kind = event[0]
            if kind == "add":
                _, token_ids, params, request_id, seed_base = event
                engine.add_request(token_ids, params, request_id, seed_base=seed_base)
            elif kind == "abort":
                engine.abort(event[1])
            elif kind == "step":
                engine.step()
            elif kind == "logits":
                engine.sequence_logits(event[1])
            elif kind == "close":
                set_tp_group(None)
                if engine.rank_context.launcher == "kiln":
                    return  # the process exits next; rank 0 tears down once it is gone
                with contextlib.suppress(Exception):  # rank 0 waits as long, then goes on
                    dist.barrier(group=engine.rank_context.commands, async_op=True).wait(
                        timedelta(seconds=30))
                _destroy_process_group()
                return
            # "ping": rank 0 checks that every rank is still there (Mirror.ping)
