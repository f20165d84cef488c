"""The engine in a child process: the server's HTTP work no longer steals its host time.

In one process, the engine thread and the event loop that writes every stream share the
GIL: at hundreds of streams, building and sending a chunk per token per stream stretches
each engine step. `EngineProcess` runs the EngineLoop in a child process (spawn: the
server never initialises CUDA) and offers AsyncLLM the EngineLoop's interface: add,
abort, finish_all, stats, alive, shutdown. Commands go down one pipe; the engine's events
come back up another, one message per engine step for all requests
(kiln.serve.engine_child), and a receiver thread here hands them to each group's sink,
which (in AsyncLLM) posts them to the event loop through its Mailbox.

Failures look as they do in one process: a bad request is the engine's RequestError; an
engine that stops or dies fails every open request with EngineDeadError, and `alive` turns
False (/health 503). The child stops when told (`shutdown`, also at interpreter exit),
and on its own when this process goes away (its command pipe closes).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing as mp
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from kiln.distributed.launch import RankDied
from kiln.errors import KilnError
from kiln.serve.engine_child import ACCEPTED, OUTPUT, child_main
from kiln.serve.engine_loop import EngineDeadError, NewRequest, OutputSink, _call
from kiln.serve.engine_wire import OutputAssembler, rebuild_error

log = logging.getLogger(__name__)


class RemoteEngine:
    """What the server reads of an engine that runs in another process (the attributes of
    LLMEngine that AsyncLLM and the routes use)."""

    def __init__(self, facts: dict[str, Any]) -> None:
        from kiln.build.engine_dir import load_engine_config
        from kiln.tokenizer import Tokenizer

        self.engine_dir = Path(facts["engine_dir"])
        self.config = load_engine_config(self.engine_dir)
        self.tokenizer = Tokenizer.from_engine(self.engine_dir)
        self.max_seq_len: int = facts["max_seq_len"]
        self.device: str = facts["device"]
        self.failure: str | None = None  # a rank of a multi-rank engine died
        self.exit_on_failure = False


@dataclass
class _Group:
    sink: OutputSink
    requests: dict[str, OutputAssembler]  # the group's unfinished requests, by id


class EngineProcess:
    """An EngineLoop in a child process, driven through the EngineLoop's interface.

    The constructor returns once the engine is loaded (raising its error if it could not
    be); `start()` then starts delivering outputs.
    """

    def __init__(self, model: str | Path | None = None, build_config: Any = None,
                 log_level: str = "info", **runtime: Any) -> None:
        context = mp.get_context("spawn")
        commands_out, self._commands = context.Pipe(duplex=False)
        self._events, events_in = context.Pipe(duplex=False)
        # The child dies with this process (kiln.serve.engine_child.watch_parent): the
        # kernel's parent-death signal fires when the thread that started it exits, so it
        # is asked for only from the main thread.
        main_thread = threading.current_thread() is threading.main_thread()
        self._process = context.Process(
            target=child_main, name="kiln-engine",
            args=(commands_out, events_in, model, build_config, runtime, log_level,
                  os.getpid(), main_thread))
        self._process.start()
        commands_out.close()  # the child's ends: else their closing would go unnoticed
        events_in.close()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # _groups, _group_of, _dead
        self._groups: dict[int, _Group] = {}
        self._group_of: dict[str, int] = {}  # request id -> group id
        self._gids = itertools.count()
        self._dead: str | None = None  # why the engine takes no more requests
        self._stopping = False
        self._receiver = threading.Thread(target=self._receive, daemon=True,
                                          name="kiln-engine-receiver")
        atexit.register(self.shutdown)
        try:
            facts = self._wait_ready()
        except BaseException:
            self._stopping = True
            atexit.unregister(self.shutdown)
            self._kill()
            raise
        self.engine = RemoteEngine(facts)
        self._stats: dict[str, float] = facts["stats"]

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _wait_ready(self) -> dict[str, Any]:
        rank = None  # a rank other than 0 under a launcher: its engine serves rank 0's
        while True:
            if not self._events.poll(0.2):
                if self._process.is_alive():
                    continue
                self._ended(rank)
            try:
                message = self._events.recv()
            except EOFError:
                self._process.join(5)
                self._ended(rank)
            if message[0] == "rank":
                rank = message[1]
                continue
            if message[0] == "failed":
                self._process.join(10)
                raise rebuild_error(*message[1])
            return message[1]

    def _ended(self, rank: int | None) -> NoReturn:
        """The engine process exited before it was ready: an error; for a rank other than
        0 (which is never ready: it serves rank 0 until rank 0 stops the engine) the end
        of this rank's work, as that of a rank that `kiln run` started."""
        code = self._process.exitcode
        if rank is None:
            raise KilnError(f"the engine process exited (exit code {code}) before it was "
                            "ready")
        if code == 0:
            # Under torchrun, exit 1: an agent whose ranks all exited 0 waits in its exit
            # barrier for the other nodes' agents (5 minutes, deaf to SIGTERM, when rank 0's
            # agent was interrupted); a failed rank ends the agent at once.
            agent = bool(os.environ.get("TORCHELASTIC_RUN_ID"))
            print(f"kiln: rank {rank}: rank 0 stopped the engine; this rank is done"
                  + (" (exit 1, so that torchrun ends this node now)" if agent else ""),
                  file=sys.stderr, flush=True)
            raise SystemExit(1 if agent else 0)
        if code is not None and code > 0:
            raise SystemExit(code)  # it said why (a lost peer rank: one line)
        raise RankDied(f"the engine process of rank {rank} died (exit code {code})")

    # ---- the EngineLoop interface (any thread) --------------------------------------
    def start(self) -> None:
        self._receiver.start()

    def add(self, requests: Sequence[NewRequest], sink: OutputSink) -> None:
        gid = next(self._gids)
        with self._lock:
            dead = self._dead
            if dead is None:
                self._groups[gid] = _Group(sink, {r.request_id: OutputAssembler(r.request_id)
                                                  for r in requests})
                for r in requests:  # a duplicate id is refused by the engine: keep the first
                    self._group_of.setdefault(r.request_id, gid)
        if dead is not None:
            sink.error(EngineDeadError(dead))
            return
        self._send(("add", gid, [(r.prompt, r.params, r.request_id) for r in requests]))

    def abort(self, request_ids: Sequence[str]) -> None:
        with self._lock:
            for request_id in request_ids:
                self._forget(request_id)
        self._send(("abort", list(request_ids)))

    def finish_all(self) -> None:
        self._send(("finish_all",))

    def stats(self) -> dict[str, float]:
        return self._stats

    @property
    def alive(self) -> bool:
        return self._dead is None and self._process.is_alive() and self.engine.failure is None

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the engine process (unfinished requests fail with EngineDeadError)."""
        atexit.unregister(self.shutdown)
        if self._stopping:
            return
        self._stopping = True
        self._send(("stop",))
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("kiln: the engine process did not stop in %ss; killing it", timeout)
            self._kill()
        if self._receiver.is_alive():
            self._receiver.join(5)
        elif self._receiver.ident is None:  # never started: fail what was submitted
            self._die("the engine has stopped")

    # ---- internals ------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._commands.send(message)
        except OSError:
            pass  # the child has gone: the receiver reports it

    def _kill(self) -> None:
        # SIGKILL: the child ignores SIGTERM (and SIGINT) from the start of child_main, so
        # a terminate() would only wait out its join (Ctrl-C during the load: 5 s more).
        self._process.kill()
        self._process.join()

    def _forget(self, request_id: str) -> None:
        """Drop a request's state (lock held); its group goes with its last request."""
        gid = self._group_of.get(request_id)
        group = self._groups.get(gid) if gid is not None else None
        if group is None or group.requests.pop(request_id, None) is None:
            return
        del self._group_of[request_id]
        if not group.requests:
            del self._groups[gid]  # type: ignore[arg-type]

    def _drop(self, gid: int) -> _Group | None:
        with self._lock:
            group = self._groups.pop(gid, None)
            for request_id in group.requests if group is not None else ():
                if self._group_of.get(request_id) == gid:
                    del self._group_of[request_id]
        return group

    def _receive(self) -> None:
        reason = None
        try:
            while True:
                try:
                    message = self._events.recv()
                except (EOFError, OSError):
                    break
                if message[0] == "dead":
                    reason = message[1]
                    break
                _, events, stats, failure = message
                if stats is not None:
                    self._stats = stats
                if failure is not None:
                    self.engine.failure = failure
                self._dispatch(events)
        except BaseException:
            log.exception("the engine receiver failed")
        finally:
            if reason is None:
                self._process.join(2)
                reason = ("the engine has stopped" if self._stopping else
                          f"the engine process died (exit code {self._process.exitcode})")
            self._die(reason)

    def _dispatch(self, events: list[tuple[int, int, Any]]) -> None:
        groups = self._groups
        for gid, kind, payload in events:
            group = groups.get(gid)
            if group is None:  # aborted, or failed already
                continue
            if kind == OUTPUT:
                assembler = group.requests.get(payload[0])
                if assembler is None:
                    continue
                output = assembler.apply(payload)
                if output.finished:
                    with self._lock:
                        self._forget(output.request_id)
                _call(group.sink.output, output)
            elif kind == ACCEPTED:
                _call(group.sink.accepted)
            else:
                self._drop(gid)
                _call(group.sink.error, rebuild_error(*payload))

    def _die(self, reason: str) -> None:
        if self._dead is None and not self._stopping:
            log.error("kiln: %s", reason)
        with self._lock:
            self._dead = self._dead or reason
            groups, self._groups = list(self._groups.values()), {}
            self._group_of = {}
        for group in groups:
            _call(group.sink.error, EngineDeadError(reason))
