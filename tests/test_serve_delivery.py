"""Outputs from the engine thread to the streams, batched and coalesced: a Mailbox wakes
the event loop once per batch, and a stream whose loop fell behind sends several tokens
in one chunk, in order, none lost, its finish_reason once."""

from __future__ import annotations

import asyncio
import threading
import time

import openai

from kiln import SamplingParams
from kiln.serve import openai_call
from kiln.serve.delivery import Mailbox
from tests.test_serve_support import MODEL

LONG = dict(temperature=0, max_tokens=24, extra_body={"ignore_eos": True})


def test_mailbox_delivers_everything_in_order_with_few_wakeups():
    got: list[int] = []

    async def run() -> int:
        loop = asyncio.get_running_loop()
        mailbox = Mailbox(loop)
        wakeups = [0]
        original = loop.call_soon_threadsafe

        def counting(*args, **kwargs):
            wakeups[0] += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        done = asyncio.Event()

        def producer() -> None:
            for i in range(2000):
                mailbox.post(got.append, i)
                if i % 100 == 99:
                    time.sleep(0.005)  # a step's outputs, then the next step
            mailbox.post(lambda _: done.set(), None)

        thread = threading.Thread(target=producer)
        thread.start()
        await asyncio.wait_for(done.wait(), 30)
        thread.join()
        return wakeups[0]

    wakeups = asyncio.run(run())
    assert got == list(range(2000))
    assert wakeups < 500  # batches, not one wakeup per post


def test_behind_stream_coalesces_tokens(client, reference, monkeypatch):
    """An event loop slower than the engine (every chunk costs 30 ms here): chunks carry
    several tokens each, and still add up to the whole text with one finish_reason."""
    want = reference.generate(["Once upon a time"],
                              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    sse = openai_call.sse

    def slow_sse(data):
        time.sleep(0.03)  # blocks the loop; the engine thread keeps stepping
        return sse(data)

    monkeypatch.setattr(openai_call, "sse", slow_sse)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time",
                                            stream=True, stream_options={"include_usage": True},
                                            **LONG))
    texts = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in texts) == want.text
    assert [c.choices[0].finish_reason for c in texts].count(None) == len(texts) - 1
    assert texts[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 24
    assert len(texts) < 24  # several tokens per chunk


def test_chat_stream_unchanged_in_form(client):
    """The role chunk first, content chunks, one finish_reason, usage last."""
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True}, **LONG))
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and finishes.count(None) == len(finishes) - 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert isinstance(chunks[-1], openai.types.chat.ChatCompletionChunk)
