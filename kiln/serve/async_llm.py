"""AsyncLLM: the asyncio front of the engine.

    llm = AsyncLLM.from_model("engines/llama", max_queue=256)
    async for output in llm.generate("Hello", SamplingParams(max_tokens=8), "req-1"):
        print(output.text)  # cumulative: the text so far

The engine steps in one background thread (`EngineLoop`), or in a child process
(`AsyncLLM.from_model(..., engine_process=True)`, kiln.serve.engine_proc: what `kiln
serve` does, so that the HTTP work does not share the GIL with the engine's step).
Either way, nothing here changes: `submit` hands a group of requests to it and waits
until the engine has accepted them, so a bad request fails right there (RequestError)
while the caller can still answer 400. Outputs travel back
through an asyncio queue per group, delivered in batches by the event loop's `Mailbox`
(kiln.serve.delivery: one wakeup per batch, not per token). Leaving the iteration
early, or cancelling the task that iterates (a client that disconnects), aborts the
requests in the engine, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from kiln.config import BuildConfig
from kiln.errors import KilnError, RequestError
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import RequestOutput, SamplingParams
from kiln.runtime.text_deltas import TextDeltas
from kiln.serve.delivery import Mailbox
from kiln.serve.engine_loop import EngineDeadError, EngineLoop, NewRequest, Prompt


class QueueFullError(KilnError):
    """More requests are unfinished than the server admits (`max_queue`)."""


_ACCEPTED = object()


@dataclasses.dataclass(frozen=True)
class _Newest:
    """In a stream's queue: `latest` holds a new output of this request."""

    request_id: str


class _AsyncSink:
    """Forwards the engine thread's events into an asyncio queue on the caller's loop.

    An output waits in `latest` (the newest a request, outputs being cumulative) with one
    _Newest in the queue until the stream takes it: a consumer that stalls (a client that
    stops reading) holds one output a request, not one a step, whose texts and token
    lists would grow with the square of the length."""

    def __init__(self, mailbox: Mailbox, events: asyncio.Queue[Any],
                 latest: dict[str, RequestOutput]) -> None:
        self._mailbox = mailbox
        self._events = events
        self._latest = latest

    def _post(self, item: object) -> None:
        try:
            self._mailbox.post(self._events.put_nowait, item)
        except RuntimeError:
            pass  # the event loop has closed: nobody is listening any more

    def accepted(self) -> None:
        self._post(_ACCEPTED)

    def output(self, output: RequestOutput) -> None:
        try:
            self._mailbox.post(self._newest, output)
        except RuntimeError:
            pass  # the event loop has closed: nobody is listening any more

    def _newest(self, output: RequestOutput) -> None:  # on the loop
        if output.request_id not in self._latest:
            self._events.put_nowait(_Newest(output.request_id))
        self._latest[output.request_id] = output

    def error(self, error: BaseException) -> None:
        self._post(error)


class RequestStream:
    """Cumulative outputs of one accepted group of requests, in arrival order.

    Iterate it to the end, or call `abort()`; `AsyncLLM.generate` does both for you.
    When the consumer falls behind, older outputs of a request are dropped in favour of
    its newest one: outputs are cumulative, so nothing is lost.
    """

    def __init__(self, owner: AsyncLLM, request_ids: list[str],
                 events: asyncio.Queue[Any], latest: dict[str, RequestOutput]) -> None:
        self.request_ids = request_ids
        self._owner = owner
        self._events = events
        self._latest = latest  # the sink's: the newest output of a request not yet taken
        self._unfinished = set(request_ids)
        self._pending: OrderedDict[str, RequestOutput] = OrderedDict()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while not self._pending:
            if not self._unfinished:
                raise StopAsyncIteration
            self._take(await self._events.get())
            while not self._events.empty():
                self._take(self._events.get_nowait())
        return self._pending.popitem(last=False)[1]

    def _take(self, item: object) -> None:
        if isinstance(item, BaseException):
            self._release(self._unfinished)
            raise item
        if isinstance(item, _Newest):
            output = self._latest.pop(item.request_id)
            self._pending[output.request_id] = output
            if output.finished:
                self._release({output.request_id})

    def _release(self, request_ids: set[str]) -> None:
        ids = request_ids & self._unfinished
        self._unfinished -= ids
        self._owner._num_unfinished -= len(ids)

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def abort(self) -> None:
        """Abort the requests that have not finished; safe to call more than once."""
        if self._unfinished:
            self._owner._loop.abort(sorted(self._unfinished))
            self._release(set(self._unfinished))


class AsyncLLM:
    """Async generation over one LLMEngine. `max_queue` caps unfinished requests.

    `engine` runs in a thread of this process; `from_model(..., engine_process=True)`
    runs it in a child process instead (then `engine` is a RemoteEngine: its config,
    tokenizer, max_seq_len and engine_dir, read here)."""

    def __init__(self, engine: LLMEngine, max_queue: int | None = None,
                 loop: Any = None) -> None:
        """`loop`: what drives the engine (default: an EngineLoop thread over `engine`;
        an EngineProcess has the same interface)."""
        self.engine = engine
        self.max_queue = max_queue
        engine.exit_on_failure = False  # a lost rank turns /health to 503; we keep answering
        self._loop = loop if loop is not None else EngineLoop(engine)
        self._num_unfinished = 0  # touched only from the event loop's thread
        self._mailboxes: dict[int, Mailbox] = {}  # by id(event loop)
        self._loop.start()

    @classmethod
    def from_model(cls, model: str | Path | None = None,
                   build_config: BuildConfig | None = None, max_queue: int | None = None,
                   engine_process: bool = False, log_level: str = "info",
                   **runtime: Any) -> AsyncLLM:
        """`model`: an engine dir, a HF folder, a GGUF, or None for the default model.
        `engine_process`: run the engine in a child process (spawned: a script that asks
        for it needs the `if __name__ == "__main__":` guard); the child logs at
        `log_level`. `kiln serve` does this unless told `--engine-in-process`."""
        config = RuntimeConfig(**runtime)  # bad options (a device this machine lacks) fail here
        if engine_process:
            from kiln.serve.engine_proc import EngineProcess

            process = EngineProcess(model, build_config, log_level, **runtime)
            return cls(process.engine, max_queue, loop=process)  # type: ignore[arg-type]
        from kiln.resolve import resolve_engine
        from kiln.runtime.heap import freeze_startup_heap

        engine_dir = resolve_engine(model, build_config)
        engine = LLMEngine(engine_dir, config)
        freeze_startup_heap()  # `kiln serve --engine-in-process` (a no-op for library callers)
        return cls(engine, max_queue)

    @property
    def tokenizer(self):  # noqa: ANN201 -- kiln.tokenizer.Tokenizer | None
        return self.engine.tokenizer

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def num_unfinished(self) -> int:
        """Requests submitted through this front that have not finished."""
        return self._num_unfinished

    @property
    def alive(self) -> bool:
        return self._loop.alive

    def stats(self) -> dict[str, float]:
        return self._loop.stats()

    async def submit(self, requests: Sequence[tuple[Prompt, SamplingParams, str]]
                     ) -> RequestStream:
        """Add a group of requests that succeed or fail together; return once the engine
        has accepted them. Raises QueueFullError at once when over `max_queue`, and the
        engine's RequestError (bad prompt, too long, duplicate id) for this group only."""
        if self.engine.failure is not None:
            raise EngineDeadError(self.engine.failure)
        if self.max_queue is not None and len(requests) > self.max_queue:
            raise RequestError(f"this call makes {len(requests)} requests (one a prompt), more "
                               f"than the server ever holds at once ({self.max_queue}, "
                               "--max-queue): send fewer prompts a call")
        if self.max_queue is not None and self._num_unfinished + len(requests) > self.max_queue:
            raise QueueFullError(f"the server is at its limit of {self.max_queue} unfinished "
                                 "requests; retry later")
        events: asyncio.Queue[Any] = asyncio.Queue()
        latest: dict[str, RequestOutput] = {}
        stream = RequestStream(self, [request_id for _, _, request_id in requests], events,
                               latest)
        self._num_unfinished += len(requests)
        try:
            self._loop.add([NewRequest(*r) for r in requests],
                           _AsyncSink(self._mailbox(), events, latest))
        except BaseException:  # (e.g. the engine process's pipe refused the request)
            stream._release(set(stream.request_ids))  # else counted toward max_queue forever
            raise
        try:
            first = await events.get()
        except asyncio.CancelledError:
            stream.abort()
            raise
        if first is not _ACCEPTED:
            stream._release(set(stream.request_ids))
            raise first
        return stream

    def _mailbox(self) -> Mailbox:
        """The running event loop's mailbox (one per loop; those of closed loops go)."""
        loop = asyncio.get_running_loop()
        mailbox = self._mailboxes.get(id(loop))
        if mailbox is None or mailbox.loop is not loop:
            self._mailboxes = {k: m for k, m in self._mailboxes.items()
                               if not m.loop.is_closed()}
            mailbox = self._mailboxes[id(loop)] = Mailbox(loop)
        return mailbox

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request until it finishes. With stop strings, each
        sequence's text holds back up to len(longest stop string) - 1 characters until
        it finishes (as vLLM does): the engine cuts a stop string once it matches, and
        the text seen so far only ever grows into the final one."""
        request_id = request_id or uuid.uuid4().hex
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()  # (puts a stop string assigned after construction in its list)
        stream = await self.submit([(prompt, params, request_id)])
        deltas: dict[int, TextDeltas] = {}
        try:
            async for output in stream:
                yield _held_back(output, params.stop, deltas) if params.stop else output
        finally:
            stream.abort()

    def finish_all(self) -> None:
        """Abort every unfinished request; each stream gets a last output with
        finish_reason "abort" (the end of a graceful shutdown's drain)."""
        self._loop.finish_all()

    def shutdown(self) -> None:
        """Stop the engine thread (or process); unfinished requests fail with
        EngineDeadError."""
        self._loop.shutdown()


def _held_back(output: RequestOutput, stop: list[str], deltas: dict[int, TextDeltas]
               ) -> RequestOutput:
    """The output with each unfinished sequence's text short of what may become a stop
    string (`deltas`: what was shown of each sequence so far, by index)."""
    completions = []
    for c in output.outputs:
        shown = deltas.setdefault(c.index, TextDeltas(stop))
        shown.next(c.text, output.finished or c.finish_reason is not None)
        completions.append(c if shown.sent == len(c.text)
                           else dataclasses.replace(c, text=c.text[:shown.sent]))
    return dataclasses.replace(output, outputs=completions)
