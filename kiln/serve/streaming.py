"""Server-sent events, and noticing clients that go away.

A client that disconnects must stop its generation at once, not when the engine next
produces a token for it (or, for a plain request, when the whole answer is ready), so
both paths here listen for `http.disconnect` while they work, and cancel the work when
it comes. Cancelling the consumer of a `RequestStream` aborts the engine requests.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class Event(str):
    """A server-sent event rendered already (TextChunk.sse)."""


def sse(data: Any) -> str:
    """One server-sent event carrying `data` (a pydantic model, a dict, or a str as is;
    an Event, rendered already, passes through)."""
    if isinstance(data, Event):
        return data
    if hasattr(data, "model_dump_json"):
        text = data.model_dump_json()
    elif isinstance(data, str):
        text = data
    else:
        text = json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


class TextChunk:
    """A streamed chunk whose only varying part is one text field: serialized once with a
    marker in that field, then filled per token by concatenation (a pydantic chunk model
    costs ~5 us per token and stream; this ~1 us)."""

    MARK = "kiln-text-8c1f2e"

    def __init__(self, chunk: Any) -> None:
        """`chunk`: the pydantic chunk with MARK as the text; a chunk that does not hold the
        marker exactly once is refused (ValueError)."""
        parts = chunk.model_dump_json().split(json.dumps(self.MARK))
        if len(parts) != 2:
            raise ValueError("the chunk must hold TextChunk.MARK exactly once")
        self._head, self._tail = parts

    def sse(self, text: str) -> Event:
        return Event(f"data: {self._head}{json.dumps(text, ensure_ascii=False)}{self._tail}\n\n")


class TextChunks:
    """One TextChunk per choice of a stream, made on first use by `make(index, text)` (the
    pydantic chunk of choice `index` carrying `text`)."""

    def __init__(self, make: Callable[[int, str], Any]) -> None:
        self._make = make
        self._chunks: dict[int, TextChunk] = {}

    def sse(self, index: int, text: str) -> Event:
        chunk = self._chunks.get(index)
        if chunk is None:
            chunk = self._chunks[index] = TextChunk(self._make(index, TextChunk.MARK))
        return chunk.sse(text)


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


class EventStreamResponse(StreamingResponse):
    """text/event-stream whose generation stops when the client disconnects.

    `on_close` runs however the response ends (finished, disconnected, failed), also when
    the body iterator never started, which its own `finally` would not cover.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away mid-write
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            finally:
                self._on_close()


async def submit_watched(ctx: Any, group: list, request: Request | None) -> Any:
    """ctx.llm.submit(group), given up (its requests aborted before the engine runs them)
    if the client leaves while the engine is busy with the step before: ClientDisconnected,
    which the app answers with 499."""
    if request is None:
        return await ctx.llm.submit(group)
    return await until_disconnect(request, ctx.llm.submit(group))


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and raising ClientDisconnected if the client leaves."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    # Let the work run its cleanup (aborting engine requests) before answering.
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected
