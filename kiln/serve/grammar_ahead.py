"""Structured-output constraints compiled off the engine thread, before their requests
are added.

Compiling a constraint (kiln.runtime.grammar) can take seconds: 8,000 `choice` options
took 6 s on a 2-core CPU, and 50,000 took minutes. Done inside `add_request` on the
engine thread, it stopped every running request for that long. Here a group whose
constraints are not compiled yet waits beside the loop while a thread of its own
compiles them; xgrammar releases the GIL, so the engine keeps stepping (the loop's
longest pause measured during that 6 s compile: 28 ms). Once compiled (and cached), the
group is added as any other: its add finds the grammar in the cache, and a constraint
that does not compile fails that group alone, with the compiler's message.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any


class GrammarAhead:
    """Groups of requests (`_Add` commands) held while their constraints compile."""

    def __init__(self, compiler: Callable[[], Any] | None) -> None:
        self._compiler = compiler  # the engine's GrammarCompiler, made on first use
        self._held: list[tuple[futures.Future, Any]] = []

    def __bool__(self) -> bool:
        return bool(self._held)

    def hold(self, command: Any) -> bool:
        """Start compiling the group's constraints that are not cached, on a daemon
        thread (one that does not keep a stopping process alive); True if the group must
        wait for them. Everything else (none, all cached, no tokenizer to compile with)
        goes straight to the add, which says what is wrong."""
        constraints = [new.params.constraint for new in command.requests
                       if new.params is not None and new.params.constraint is not None]
        if not constraints or self._compiler is None:
            return False
        try:
            compiler = self._compiler()
        except Exception:  # (RequestError: no tokenizer) the add raises it again
            return False
        new = [c for c in constraints if not compiler.cached(c)]
        if not new:
            return False
        done: futures.Future = futures.Future()

        def compile_all() -> None:
            try:
                for constraint in new:
                    compiler.matcher(constraint)
            except BaseException as e:  # noqa: BLE001 -- handed to the group's sink
                done.set_exception(e)
            else:
                done.set_result(None)

        threading.Thread(target=compile_all, name="kiln-grammar", daemon=True).start()
        self._held.append((done, command))
        return True

    def wait(self, timeout: float) -> None:
        """Block until a held group's compile ends, at most `timeout` seconds."""
        futures.wait([f for f, _ in self._held], timeout, futures.FIRST_COMPLETED)

    def ready(self) -> list[tuple[Any, BaseException | None]]:
        """The groups whose compiles ended, in the order they came, each with the error
        its compile raised (None: compiled); they are held no more."""
        ended = [(c, f.exception()) for f, c in self._held if f.done()]
        self._held = [(f, c) for f, c in self._held if not f.done()]
        return ended

    def drop(self, request_ids: Sequence[str]) -> list[Any]:
        """Let go of the held groups with any of these requests (aborted: a client that
        left while its grammar compiled); returns them."""
        ids = set(request_ids)
        gone = [c for _, c in self._held if any(n.request_id in ids for n in c.requests)]
        self._held = [(f, c) for f, c in self._held if all(c is not g for g in gone)]
        return gone

    def release_all(self) -> list[Any]:
        """Every held group (the loop stops or drains), held no more."""
        held, self._held = [c for _, c in self._held], []
        return held
