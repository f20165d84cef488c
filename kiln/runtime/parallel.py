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
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kiln.distributed import launch
from kiln.distributed.comm import set_tp_group

if TYPE_CHECKING:
    from kiln.runtime.engine import LLMEngine, RuntimeConfig

log = logging.getLogger(__name__)


class Mirror:
    """Rank 0's end: queues state-changing calls and sends them with the next one that
    needs the workers (step, logits, close)."""

    def __init__(self, ctx: launch.RankContext, workers: list[Any],
                 threads_before: int | None = None) -> None:
        self.ctx = ctx
        self.workers = workers
        self.threads_before = threads_before  # this process's CPU threads before join
        self.channel = launch.channel(ctx, alive=lambda: all(w.is_alive() for w in workers))
        self.pending: list[tuple] = []
        self.closed = False

    def record(self, event: tuple) -> None:
        self.pending.append(event)

    def send(self, event: tuple) -> None:
        events, self.pending = [*self.pending, event], []
        self.channel.send(events)

    def lost_rank(self, wait: float = 2.0, error: BaseException | None = None) -> str | None:
        """Why a collective failed, if a worker process is gone (waiting briefly: the
        error can reach us before the process is reaped); under a launcher, whose ranks
        are no processes of ours, if the error says a peer is gone."""
        if not self.workers:
            return launch.peer_lost(error, self.ctx.rank)
        deadline = time.monotonic() + wait
        while True:
            for rank, worker in enumerate(self.workers, start=1):
                if not worker.is_alive():
                    return f"kiln: worker rank {rank} died (exit code {worker.exitcode}); " \
                           "the engine cannot continue"
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def close(self, exiting: bool = False) -> None:
        """Stop the workers. At interpreter exit, once the workers kiln spawned are gone,
        the process group is left to the OS: NCCL's teardown can block without peers."""
        if self.closed:
            return
        self.closed = True
        workers = list(self.workers)
        self.workers.clear()  # in place: the watcher holds this list and stops watching
        try:
            self.send(("close",))
            dist.barrier(group=self.ctx.commands)
        except Exception:  # a worker already gone: nothing left to tell
            pass
        set_tp_group(None)
        for worker in workers:  # they tear down and exit; then nothing waits on a peer
            worker.join(timeout=30)
        # Under a launcher the peers tear their groups down now too (launched_worker), so
        # rank 0 does the same rather than leave gloo's threads to interpreter teardown.
        if not exiting or self.ctx.launcher != "kiln":
            _destroy_process_group()
        if isinstance(self.channel, launch.ShmChannel):
            self.channel.close()
        if self.threads_before is not None:  # join split the cores between the ranks
            torch.set_num_threads(self.threads_before)


def start(engine: LLMEngine, world: int, device_type: str) -> tuple[launch.RankContext, Mirror
                                                                     | None]:
    """Join (or create) this engine's ranks. Returns the rank's context and, on rank 0,
    the mirror; a rank other than 0 under a launcher runs the worker loop and exits."""
    env = launch.launcher_rank()
    if env is not None:
        rank, env_world, local_rank = env
        if env_world != world:
            from kiln.errors import KilnError

            raise KilnError(f"{engine.engine_dir} is built for {world} ranks (tp x pp), but "
                            f"the launcher started {env_world}; launch {world} processes")
        threads = torch.get_num_threads()
        ctx = launch.join(rank, world, local_rank, device_type,
                          tp_size=engine.config.build.tp_size)
        if rank != 0:
            return ctx, None
        mirror = Mirror(ctx, [], threads)
        atexit.register(mirror.close, exiting=True)
        return ctx, mirror
    if dist.is_initialized():
        from kiln.errors import KilnError

        raise KilnError("this process still holds the process group of an earlier "
                        "multi-GPU engine that could not be released; start the new engine "
                        "in a new process")
    if launch.reimporting_main():  # a spawned worker re-running an unguarded script
        raise SystemExit(launch.MAIN_REIMPORTED)  # rank 0 says what to do (death_message)
    port = launch.free_port()
    tp = engine.config.build.tp_size
    spec = launch.ShmChannel.create(world)
    workers = launch.spawn(world, _spawned_worker,
                           (world, tp, port, str(engine.engine_dir), engine.runtime, spec))
    threads = torch.get_num_threads()
    joined = False

    def on_death(message: str) -> None:
        if not joined:  # nothing interrupts the rendezvous: the one line, and exit
            launch.fail(message)
        engine.fail(message)

    try:
        launch.await_started(workers, spec["started"])  # a worker that died says so now
        launch.watch(workers, on_death)
        ctx = launch.join(0, world, 0, device_type, f"tcp://127.0.0.1:{port}", "kiln", tp)
    except BaseException:
        stopped = list(workers)
        workers.clear()  # the watcher stops watching
        for worker in stopped:
            worker.kill()
        launch.ShmChannel.discard(spec)
        torch.set_num_threads(threads)  # join split the cores for the ranks that failed
        raise
    joined = True
    ctx.channel_spec = spec
    mirror = Mirror(ctx, workers, threads)
    # Every worker attached the ring before joining the process group, so its name can
    # go now: nothing is left in /dev/shm even if every process is killed.
    mirror.channel.close(unlink=True, keep_mapping=True)
    atexit.register(mirror.close, exiting=True)
    return ctx, mirror


def _destroy_process_group(timeout: float = 10.0) -> None:
    """Tear the process group down in a thread, giving up after `timeout`: NCCL's
    teardown has blocked on two H200s (destroy_process_group past 15 s), and a stuck close
    is worse than a leaked communicator. NCCL groups are aborted (ncclCommAbort waits for
    no peer; nothing is in flight at close), gloo groups destroyed; both unregister the
    groups, so this process can start another multi-rank engine."""
    import threading

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
                    runtime: RuntimeConfig, channel_spec: dict | None = None) -> None:
    from kiln.runtime.engine import LLMEngine

    launch.die_with_parent()
    device_type = "cuda" if runtime.device.startswith("cuda") or (
        runtime.device == "auto" and _cuda()) else "cpu"
    channel = launch.ShmChannel(channel_spec, rank, None) if channel_spec else None
    if channel_spec:
        channel_spec["started"].release()  # rank 0 stops watching for a death at start
    ctx = launch.join(rank, world, rank, device_type, f"tcp://127.0.0.1:{port}", "kiln",
                      tp_size)
    ctx.channel_spec = channel_spec
    ctx.channel = channel  # attached before joining: rank 0 unlinks the name after
    try:
        engine = LLMEngine(Path(engine_dir), runtime, rank_context=ctx)
        run_worker(engine)
    except Exception:
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
                dist.barrier(group=engine.rank_context.commands)
                set_tp_group(None)
                if engine.rank_context.launcher == "kiln":
                    return  # the process exits next; rank 0 tears down once it is gone
                _destroy_process_group()
                return
