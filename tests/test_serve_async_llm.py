"""AsyncLLM: the asyncio front over the engine thread."""

from __future__ import annotations

import asyncio
import time

import pytest

from kiln import LLM, SamplingParams
from kiln.errors import RequestError
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.serve import AsyncLLM
from kiln.serve.async_llm import QueueFullError
from kiln.serve.engine_loop import EngineDeadError
from tests.test_serve_support import tiny_chat_engine, wait_until

GREEDY = SamplingParams(max_tokens=8, temperature=0)
LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    front = AsyncLLM(LLMEngine(tiny_chat_engine(), RuntimeConfig(device="cpu")), max_queue=8)
    yield front
    front.shutdown()


def _all_free(llm: AsyncLLM) -> bool:
    return wait_until(lambda: llm.num_unfinished == 0 and llm.stats()["kv_blocks_used"] == 0)


def test_generate_streams_cumulative_outputs(llm):
    want = LLM(tiny_chat_engine(), device="cpu").generate("Hello there", GREEDY)[0]

    async def run() -> list:
        return [out async for out in llm.generate("Hello there", GREEDY, "cumulative")]

    outputs = asyncio.run(run())
    # one output a step, except that a consumer behind the engine gets the newest only
    lengths = [len(o.token_ids) for o in outputs]
    assert lengths == sorted(set(lengths)) and lengths[-1] == len(want.token_ids)
    assert all(b.token_ids[:len(a.token_ids)] == a.token_ids
               for a, b in zip(outputs, outputs[1:]))
    assert all(b.text.startswith(a.text) for a, b in zip(outputs, outputs[1:]))
    assert outputs[-1].finished and outputs[-1].token_ids == want.token_ids
    assert outputs[-1].text == want.text
    assert _all_free(llm)


def test_a_stalled_consumer_holds_one_output_a_request(llm):
    """A consumer that stops reading (a client that does not read its stream) while its
    request runs to the end: one output waits for it, the newest, not one a step (each
    holds the whole text so far)."""
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def run() -> tuple[int, list]:
        stream = await llm.submit([("Tell me a long story", params, "stalled")])
        deadline = time.monotonic() + 60
        while llm.stats()["kv_blocks_used"] > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # the loop runs: the engine's outputs arrive
        await asyncio.sleep(0.3)
        waiting = stream._events.qsize()
        return waiting, [out async for out in stream]

    waiting, outputs = asyncio.run(run())
    assert waiting == 1, waiting
    assert len(outputs) == 1 and outputs[0].finished and len(outputs[0].token_ids) == 40
    assert _all_free(llm)


def test_cancelled_consumer_aborts_and_frees_blocks(llm):
    async def consume(seen: asyncio.Event) -> None:
        async for _ in llm.generate("Tell me a long story", LONG):
            seen.set()

    async def run() -> None:
        seen = asyncio.Event()
        task = asyncio.create_task(consume(seen))
        await seen.wait()
        assert llm.stats()["kv_blocks_used"] > 0 or llm.num_unfinished == 1
        task.cancel()  # what a client disconnect does to its handler
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert _all_free(llm)


def test_leaving_the_loop_early_aborts(llm):
    async def run() -> int:
        count = 0
        async for _ in llm.generate("Tell me a long story", LONG):
            count += 1
            if count == 3:
                break
        return count

    assert asyncio.run(run()) == 3
    assert _all_free(llm)


def test_bad_request_fails_only_its_caller(llm):
    async def collect(prompt: str, params: SamplingParams) -> str:
        text = ""
        async for out in llm.generate(prompt, params):
            text = out.text
        return text

    async def run() -> list:
        return await asyncio.gather(
            collect("A fine prompt", GREEDY),
            collect("A fine prompt", SamplingParams(max_tokens=10_000)),
            collect("", GREEDY), return_exceptions=True)

    good, too_long, empty = asyncio.run(run())
    assert isinstance(good, str) and good
    assert isinstance(too_long, RequestError) and "max_seq_len" in str(too_long)
    assert isinstance(empty, RequestError) and "empty" in str(empty)
    assert _all_free(llm)


def test_groups_are_all_or_nothing(llm):
    async def run() -> None:
        with pytest.raises(RequestError):
            await llm.submit([("ok", GREEDY, "g-0"), ("ok", SamplingParams(max_tokens=9999),
                                                      "g-1")])
        # the first was added, then taken back: its id is free again
        stream = await llm.submit([("ok", GREEDY, "g-0")])
        async for _ in stream:
            pass
        stream_a = await llm.submit([("ok", LONG, "dup")])
        with pytest.raises(RequestError, match="already in use"):
            await llm.submit([("ok", GREEDY, "dup")])
        stream_a.abort()

    asyncio.run(run())
    assert _all_free(llm)


def test_queue_limit(llm):
    async def run() -> None:
        streams = [await llm.submit([(f"p{i}", LONG, f"q-{i}")]) for i in range(8)]
        with pytest.raises(QueueFullError):
            await llm.submit([("one more", GREEDY, "q-8")])
        for stream in streams:
            stream.abort()

    asyncio.run(run())
    assert _all_free(llm)


def test_idle_engine_thread_sleeps(llm):
    assert _all_free(llm)
    started = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - started < 0.1  # no busy loop


def test_shutdown_fails_what_is_left():
    front = AsyncLLM(LLMEngine(tiny_chat_engine(), RuntimeConfig(device="cpu")))

    async def run() -> None:
        stream = await front.submit([("Tell me a long story", LONG, "s")])
        await stream.__anext__()
        await asyncio.to_thread(front.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await front.submit([("again", GREEDY, "t")])

    asyncio.run(run())
    assert not front.alive


def test_a_request_the_loop_refuses_is_not_counted_as_unfinished(llm, monkeypatch):
    """An exception from the engine loop's add (the engine process's pipe refusing an
    unpicklable request) left the request counted toward max_queue for good."""
    def refuse(*_):
        raise TypeError("cannot pickle this request")

    monkeypatch.setattr(llm._loop, "add", refuse)
    before = llm.num_unfinished

    async def run() -> None:
        await llm.submit([("Hello", GREEDY, "refused")])

    with pytest.raises(TypeError, match="cannot pickle"):
        asyncio.run(run())
    assert llm.num_unfinished == before
