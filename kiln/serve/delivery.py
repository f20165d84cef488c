"""Handing the engine thread's outputs to the event loop: one wakeup per batch.

The engine thread makes one output per running request per step. Posting each one with
its own `call_soon_threadsafe` costs a self-pipe write and an event-loop wakeup per token
(hundreds per step at high concurrency), each taking the GIL from the engine thread. A
`Mailbox` takes the posts for one event loop and delivers them in batches: a post that
comes while a delivery is already scheduled rides along with it, so a step's outputs
for every stream arrive with one wakeup.

A stream whose task has not run since its last output finds several outputs at once;
`RequestStream` keeps the newest (outputs are cumulative), so one chunk then carries
several tokens, in order, none dropped.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from typing import Any


class Mailbox:
    """Delivers `(callback, item)` posts from other threads on `loop`, in order, batched."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: collections.deque[tuple[Callable[[Any], None], Any]] = \
            collections.deque()
        self._scheduled = False
        self._lock = threading.Lock()

    def post(self, deliver: Callable[[Any], None], item: Any) -> None:
        """Call `deliver(item)` on the loop soon (any thread); RuntimeError if the loop
        has closed."""
        self._items.append((deliver, item))
        if self._scheduled:  # a delivery is on its way and will take this one too
            return
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            self._scheduled = False
            raise

    def _deliver(self) -> None:  # the loop's thread
        # Clear the flag before taking items: a post after this point schedules again.
        with self._lock:
            self._scheduled = False
        items = self._items
        while items:
            deliver, item = items.popleft()
            deliver(item)
