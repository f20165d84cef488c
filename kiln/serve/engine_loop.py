"""EngineLoop: one background thread owns an LLMEngine and runs its step loop.

Nothing else touches the engine. Other threads hand in add/abort commands through a
thread-safe queue; the loop applies them between steps and hands each request's outputs
to that request's sink, from the engine thread. When no request is unfinished the thread
blocks on the command queue, so an idle server burns no CPU.

This module knows nothing of asyncio or HTTP: the asyncio front (`AsyncLLM`) and the
Triton Python backend model both sit on it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kiln.errors import KilnError, RequestError
from kiln.runtime.engine import LLMEngine
from kiln.runtime.request import RequestOutput, SamplingParams
from kiln.serve.grammar_ahead import GrammarAhead

log = logging.getLogger(__name__)

Prompt = str | list[int]


class EngineStepError(KilnError):
    """The engine failed while running a step; the requests it held were ended."""


class EngineDeadError(KilnError):
    """The engine loop has stopped and takes no more requests."""


class OutputSink(Protocol):
    """Receives one group's events, always on the engine thread; must not block long."""

    def accepted(self) -> None:
        """Every request of the group was added to the engine."""

    def output(self, output: RequestOutput) -> None:
        """A new cumulative output of one request of the group."""

    def error(self, error: BaseException) -> None:
        """The group failed (RequestError on add, EngineStepError later); no more events."""


@dataclass(frozen=True)
class NewRequest:
    prompt: Prompt
    params: SamplingParams
    request_id: str


@dataclass
class _Add:
    requests: Sequence[NewRequest]
    sink: OutputSink


@dataclass
class _Abort:
    request_ids: Sequence[str]
    notify: bool = False  # send each request's last output, finish_reason "abort"


_STOP = object()


class EngineLoop:
    """Owns `engine` from `start()` on; call only the methods below from other threads."""

    def __init__(self, engine: LLMEngine,
                 on_stats: Callable[[dict[str, float]], None] | None = None,
                 on_iteration: Callable[[], None] | None = None) -> None:
        """`on_stats` (engine thread) hears the stats whenever a step or command changed
        them, e.g. to push them to a metrics system that is not scraped from here.
        `on_iteration` (engine thread) runs after each round of commands and step, and
        once more when the loop ends: where a sink that batches a step's events sends
        them (kiln.serve.engine_child)."""
        self.engine = engine
        self._on_stats = on_stats
        self._on_iteration = on_iteration
        self._commands: queue.SimpleQueue[_Add | _Abort | object] = queue.SimpleQueue()
        self._sinks: dict[str, OutputSink] = {}  # engine thread only
        # groups whose grammars compile beside the loop before their add (engine thread)
        self._ahead = GrammarAhead(getattr(engine, "_grammar_compiler", None))
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._stopped = threading.Event()
        # A multi-rank engine under a launcher pings its other ranks while idle, so that a
        # rank lost then turns the engine unhealthy at once (kiln.runtime.parallel.Mirror)
        mirror = getattr(engine, "mirror", None)
        self._ping_every: float | None = getattr(mirror, "ping_every", None)

    # ---- any thread -----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def run(self) -> None:
        """Run the loop in the calling thread instead of `start()`ing its own, until
        `shutdown()` (from another thread) or a crash."""
        self._thread = threading.current_thread()
        self._run()

    def add(self, requests: Sequence[NewRequest], sink: OutputSink) -> None:
        """Queue a group of requests that succeed or fail together (e.g. the n choices of
        one API call). The sink hears `accepted` or `error` first, then outputs."""
        if self._stopped.is_set():
            sink.error(EngineDeadError("the engine has stopped"))
            return
        self._commands.put(_Add(requests, sink))

    def abort(self, request_ids: Sequence[str]) -> None:
        """End these requests and free their KV blocks; their sink hears nothing more."""
        self._commands.put(_Abort(request_ids))

    def finish_all(self) -> None:
        """Abort every unfinished request; unlike `abort`, each sink hears a last output
        with finish_reason "abort" (a server that drains before it stops)."""
        self._commands.put(_Abort((), notify=True))

    def stats(self) -> dict[str, float]:
        """The engine's stats as of the end of its last step (a snapshot, never torn)."""
        return self._stats

    @property
    def alive(self) -> bool:
        """False once the loop stopped, or a rank of a multi-rank engine died."""
        return self._thread.is_alive() and not self._stopped.is_set() and \
            self.engine.failure is None

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._commands.put(_STOP)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---- engine thread --------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                # Block only when there is nothing to step: an idle engine sleeps here
                # (or waits on the grammars being compiled, a moment at a time).
                idle = not self.engine.has_unfinished()
                if idle and self._ahead:
                    self._ahead.wait(0.05)
                if not self._apply(self._next_commands(block=idle and not self._ahead)):
                    return
                self._add_compiled()
                if self.engine.has_unfinished():
                    self._step()
                stats = self.engine.stats()
                if self._on_stats is not None and stats != self._stats:
                    _call(self._on_stats, stats)
                self._stats = stats
                if self._on_iteration is not None:
                    _call(self._on_iteration)
        except BaseException:  # a bug in this loop: fail everyone rather than hang them
            log.exception("the engine loop crashed")
            raise
        finally:
            self._stopped.set()
            dead = EngineDeadError("the engine has stopped")
            self._fail_all(dead)
            late = [c for c in self._next_commands(block=False) if isinstance(c, _Add)]
            for command in self._ahead.release_all() + late:  # adds that came too late
                _call(command.sink.error, dead)
            if self._on_iteration is not None:
                _call(self._on_iteration)

    def _next_commands(self, block: bool) -> list[object]:
        commands = []
        while block and not commands:
            try:
                commands.append(self._commands.get(timeout=self._ping_every))
            except queue.Empty:
                self._ping()
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, commands: list[object]) -> bool:
        for i, command in enumerate(commands):
            if command is _STOP:
                dead = EngineDeadError("the engine has stopped")
                for later in commands[i + 1:]:
                    if isinstance(later, _Add):
                        _call(later.sink.error, dead)
                return False
            if isinstance(command, _Abort) and command.notify:
                self._finish_all()
            elif isinstance(command, _Abort):
                self._ahead.drop(command.request_ids)  # left while its grammar compiled
                for request_id in command.request_ids:
                    if self._sinks.pop(request_id, None) is not None:
                        self.engine.abort(request_id)
            elif isinstance(command, _Add) and not self._ahead.hold(command):
                self._add(command)
        return True

    def _add(self, command: _Add) -> None:
        added: list[str] = []
        try:
            for new in command.requests:
                added.append(self.engine.add_request(new.prompt, new.params, new.request_id))
        except Exception as e:
            # All or nothing: one bad prompt must not leave the rest of its call running.
            for request_id in added:
                self.engine.abort(request_id)
            if not isinstance(e, KilnError):
                log.exception("add_request failed")
                e = RequestError(f"the request could not be added: {type(e).__name__}")
            _call(command.sink.error, e)
            return
        for request_id in added:
            self._sinks[request_id] = command.sink
        _call(command.sink.accepted)

    def _add_compiled(self) -> None:
        """Add the held groups whose grammars compiled; fail those whose did not."""
        for command, error in self._ahead.ready():
            if error is None:
                self._add(command)  # the grammars are in the cache now
                continue
            if not isinstance(error, KilnError):
                log.error("compiling a grammar failed: %r", error)
                error = RequestError(f"the request could not be added: {type(error).__name__}")
            _call(command.sink.error, error)

    def _ping(self) -> None:
        try:
            self.engine.mirror.ping()
        except KilnError:  # a rank was lost: the engine logged it and says so (failure)
            pass
        except Exception:
            log.exception("pinging the engine's other ranks failed")

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            if not isinstance(e, KilnError):
                log.exception("engine step failed; ending the requests it held")
            elif str(e) != getattr(self.engine, "failure", None):  # else logged once already
                log.error("engine step failed (%s); ending the requests it held", e)
            self._fail_all(EngineStepError(f"the engine failed: {e}"))
            return
        for output in outputs:
            sink = (self._sinks.pop(output.request_id, None) if output.finished
                    else self._sinks.get(output.request_id))
            if sink is not None:
                _call(sink.output, output)

    def _finish_all(self) -> None:
        for command in self._ahead.release_all():  # not added yet: nothing to finish
            _call(command.sink.error, RequestError("the server is stopping"))
        sinks, self._sinks = self._sinks, {}
        for request_id, sink in sinks.items():
            group = self.engine.groups.get(request_id)
            self.engine.abort(request_id)
            if group is not None:
                _call(sink.output, group.output())

    def _fail_all(self, error: KilnError) -> None:
        sinks, self._sinks = self._sinks, {}
        for request_id in sinks:
            try:
                self.engine.abort(request_id)
            except Exception:
                log.exception("abort of %s failed", request_id)
        for sink in {id(s): s for s in sinks.values()}.values():
            _call(sink.error, error)


def _call(fn: Callable[..., object], *args: object) -> None:
    """Run a sink callback; a broken sink must not take the engine thread down."""
    try:
        fn(*args)
    except Exception:
        log.exception("output sink failed")
