"""The engine process: an EngineLoop in a child of the server (kiln.serve.engine_proc).

The child builds or loads the engine, says "ready" with the facts the server needs (or
"failed" with the error), then runs the loop in its main thread while a reader thread
applies the server's commands (add, abort, finish_all, stop). What the loop hands to the
sinks is collected and sent once per loop iteration: one message per engine step for
every request (outputs as deltas, kiln.serve.engine_wire), with the stats when changed.

The child ignores SIGINT and SIGTERM (a Ctrl-C in the terminal reaches the whole process
group; the server drains first, then stops the child). It stops when the server says so,
or when the command pipe closes: the server has gone, however it went. It also dies with
the server (`watch_parent`): the engine of a rank other than 0 under a launcher serves
rank 0's from its constructor, never reads the pipe, and would be left serving alone.

    server -> child: ("add", gid, [(prompt, params, request_id), ...]) | ("abort", [ids])
                     | ("finish_all",) | ("stop",)
    child -> server: ("ready", facts) | ("failed", error) | ("dead", reason)
                     | ("rank", N) (a rank N > 0 under a launcher: it will not be ready)
                     | ("step", [(gid, ACCEPTED | OUTPUT | ERROR, payload), ...],
                        stats or None, failure or None)
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from kiln.errors import KilnError
from kiln.serve.engine_wire import OutputEncoder, portable_error

ACCEPTED, OUTPUT, ERROR = 0, 1, 2

log = logging.getLogger("kiln.serve.engine")


class _Outbox:
    """The events of one loop iteration, sent as one message by `flush` (engine thread)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.loop: Any = None  # the EngineLoop, set before it runs
        self._events: list[tuple[int, int, Any]] = []
        self._lock = threading.Lock()
        self._stats: dict[str, float] | None = None  # changed since the last message
        self.failure: str | None = None

    def put(self, event: tuple[int, int, Any]) -> None:
        with self._lock:
            self._events.append(event)

    def stats_changed(self, stats: dict[str, float]) -> None:
        """The loop's on_stats (it tells only of changes): sent with the next flush."""
        with self._lock:
            self._stats = stats

    def flush(self) -> None:
        with self._lock:
            events, self._events = self._events, []
            stats, self._stats = self._stats, None
            failure = self.loop.engine.failure
            failure, self.failure = (failure if failure != self.failure else None), failure
            if events or stats is not None or failure is not None:
                self.send(("step", events, stats, failure))

    def send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError:
            pass  # the server has gone: the reader sees the pipe close and stops the loop


class _GroupSink:
    """The OutputSink of one group (one API call) in the child: events to the outbox."""

    def __init__(self, outbox: _Outbox, gid: int) -> None:
        self._outbox = outbox
        self._gid = gid
        self._encoder = OutputEncoder()

    def accepted(self) -> None:
        self._outbox.put((self._gid, ACCEPTED, None))

    def output(self, output: Any) -> None:
        self._outbox.put((self._gid, OUTPUT, self._encoder.encode(output)))

    def error(self, error: BaseException) -> None:
        self._outbox.put((self._gid, ERROR, portable_error(error)))


def _read_commands(conn: Connection, loop: Any, outbox: _Outbox) -> None:
    from kiln.serve.engine_loop import NewRequest

    while True:
        try:
            if not conn.poll(0.5):
                # A rank that dies while the loop is idle: tell the server now (/health).
                if loop.engine.failure != outbox.failure:
                    outbox.flush()
                continue
            message = conn.recv()
        except (EOFError, OSError):
            log.info("kiln: the server has gone; stopping the engine")
            break
        kind = message[0]
        if kind == "add":
            loop.add([NewRequest(*r) for r in message[2]], _GroupSink(outbox, message[1]))
            if not loop.alive:  # refused at once, from this thread: send it now
                outbox.flush()
        elif kind == "abort":
            loop.abort(message[1])
        elif kind == "finish_all":
            loop.finish_all()
        elif kind == "stop":
            break
    loop.shutdown(timeout=0)


def watch_parent(parent: int | None, death_signal: bool = True) -> None:
    """End this process when the server's does, however it ends: the kernel kills it
    (Linux's parent-death signal, where `death_signal`), else a thread sees it adopted
    by another process within half a second. Rank 0's engine also stops when its command
    pipe closes; the engine of a rank other than 0 (under a launcher) never reads the
    pipe: it would serve on, orphaned, and rank 0 would never see the rank lost."""
    if parent is None:
        return
    if death_signal:
        from kiln.distributed.launch import die_with_parent

        die_with_parent(parent)
    elif os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="kiln-parent-watch").start()


def child_main(commands: Connection, outputs: Connection, model: Any, build_config: Any,
               runtime: dict[str, Any], log_level: str, parent: int | None = None,
               death_signal: bool = True) -> None:
    """The engine process's entry point (multiprocessing, spawn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watch_parent(parent, death_signal)
    from kiln.serve.server import configure_logging  # the server's format, in this process too

    configure_logging(log_level)
    try:
        from kiln.distributed.launch import launcher_rank
        from kiln.resolve import resolve_engine
        from kiln.runtime.engine import LLMEngine, RuntimeConfig
        from kiln.runtime.heap import allow_freeze, freeze_startup_heap

        engine_dir = resolve_engine(model, build_config)
        if (env := launcher_rank()) is not None and env[0] != 0:
            # Its engine serves rank 0's until rank 0 closes it, then the process exits
            # (LLMEngine() does not return): no "ready" will come (EngineProcess._ended).
            outputs.send(("rank", env[0]))
        engine = LLMEngine(engine_dir, RuntimeConfig(**runtime))
        allow_freeze()  # a process of its own, serving until it is told to stop
        freeze_startup_heap()
    except BaseException as e:
        if not isinstance(e, KilnError):
            log.exception("the engine could not be started")
        outputs.send(("failed", portable_error(e)))
        return
    from kiln.serve.engine_loop import EngineLoop

    engine.exit_on_failure = False  # a lost rank turns /health to 503; the server answers
    outbox = _Outbox(outputs)
    loop = outbox.loop = EngineLoop(engine, on_stats=outbox.stats_changed,
                                    on_iteration=outbox.flush)
    outbox.send(("ready", {"engine_dir": str(engine.engine_dir),
                           "max_seq_len": engine.max_seq_len, "device": str(engine.device),
                           "stats": engine.stats()}))
    threading.Thread(target=_read_commands, args=(commands, loop, outbox), daemon=True,
                     name="kiln-engine-commands").start()
    reason = "the engine has stopped"
    try:
        loop.run()
    except BaseException as e:  # logged by the loop; every sink has heard EngineDeadError
        reason = f"the engine process failed: {type(e).__name__}: {e}"
    finally:
        outbox.send(("dead", reason))
        engine.close()
