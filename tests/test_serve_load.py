"""A bounded load test: 64 concurrent streaming clients, a few hundred requests, one in
ten cancelled mid-stream. Every other request gets exactly the engine's greedy tokens,
the server stays healthy, and every KV block comes back."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import openai
import pytest

from kiln import LLM, SamplingParams
from tests.test_serve_support import MODEL, metric, serve, tiny_chat_engine, wait_until

NUM_REQUESTS = 320
CONCURRENCY = 64
MAX_TOKENS = 6
CANCEL_MAX_TOKENS = 120  # long enough that only an abort ends them early


def _prompts() -> list[str]:
    rng = random.Random(0)
    words = "kiln fire clay glaze pot wheel heat ash brick oven tile cup bowl".split()
    return [f"Request {i}: " + " ".join(rng.choices(words, k=rng.randint(3, 30)))
            for i in range(NUM_REQUESTS)]


@pytest.mark.slow
@pytest.mark.parametrize("engine_process", [False, True], ids=["in-process", "engine-process"])
def test_concurrent_streams_with_cancellations(engine_process):
    prompts = _prompts()
    cancelled = set(range(5, NUM_REQUESTS, 10))  # 10%
    kept = [i for i in range(NUM_REQUESTS) if i not in cancelled]
    reference = LLM(tiny_chat_engine(), device="cpu")
    want = reference.generate([prompts[i] for i in kept],
                              SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                             ignore_eos=True))
    expected = {i: out.text for i, out in zip(kept, want)}

    with serve(engine_process=engine_process) as server:
        async def one(client: openai.AsyncOpenAI, limit: asyncio.Semaphore, i: int
                      ) -> tuple[int, str, str | None, int]:
            cancel = i in cancelled
            async with limit:
                stream = await client.completions.create(
                    model=MODEL, prompt=prompts[i], temperature=0, stream=True,
                    max_tokens=CANCEL_MAX_TOKENS if cancel else MAX_TOKENS,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                text, finish, chunks = "", None, 0
                async for chunk in stream:
                    if chunk.usage is not None:  # the last chunk: no choices
                        # (a cancelled stream read after its engine finished it gets it
                        # too: the whole CANCEL_MAX_TOKENS may come in one chunk)
                        assert chunk.usage.completion_tokens == (
                            CANCEL_MAX_TOKENS if cancel else MAX_TOKENS)
                        continue
                    chunks += 1
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                    if cancel and chunks == 2:
                        break  # hang up mid-stream
                await stream.close()
            return i, text, finish, chunks

        async def run() -> list[tuple[int, str, str | None, int]]:
            # The client's default retries stay on: on a loaded machine a slow client can
            # reuse a keep-alive connection just as the server times it out (a race of
            # HTTP/1.1 itself, before the request reaches the server).
            client = openai.AsyncOpenAI(
                base_url=server.v1, api_key="unused", max_retries=2, timeout=120,
                http_client=httpx.AsyncClient(limits=httpx.Limits(
                    max_connections=CONCURRENCY + 8)))
            limit = asyncio.Semaphore(CONCURRENCY)
            try:
                return await asyncio.gather(*(one(client, limit, i)
                                              for i in range(NUM_REQUESTS)))
            finally:
                await client.close()

        started = time.monotonic()
        results = asyncio.run(run())
        elapsed = time.monotonic() - started
        print(f"{NUM_REQUESTS} requests in {elapsed:.1f} s")

        for i, text, finish, chunks in results:
            if i in cancelled:  # hung up after 2 chunks, unless it ended first (below)
                assert (chunks == 2 and finish is None) or finish == "length", (chunks, finish)
            else:
                assert text == expected[i], f"request {i}"
                assert finish == "length"

        # Aborts reach the engine: every block is free again, nothing is left running.
        assert wait_until(lambda: server.llm.stats()["kv_blocks_used"] == 0
                          and server.llm.num_unfinished == 0)
        stats = server.llm.stats()
        assert stats["num_running"] == 0 and stats["num_waiting"] == 0
        scraped = httpx.get(server.url + "/metrics").text
        assert metric(scraped, "kiln_kv_blocks_used") == 0
        # A hung-up stream's abort races its last tokens: on a fast engine a cancelled
        # request may reach its CANCEL_MAX_TOKENS first (3 of 32 once in CI with the
        # engine process), and then ends by length; most must end by the abort.
        aborted = metric(scraped, 'kiln_requests_finished_total{finish_reason="abort"}')
        by_length = metric(scraped, 'kiln_requests_finished_total{finish_reason="length"}')
        assert aborted + by_length == NUM_REQUESTS and by_length >= len(kept)
        assert aborted >= len(cancelled) * 3 // 4, (aborted, len(cancelled))
        # ... and the server still answers.
        assert httpx.get(server.url + "/health").status_code == 200
        again = openai.OpenAI(base_url=server.v1, api_key="unused").completions.create(
            model=MODEL, prompt=prompts[0], temperature=0, max_tokens=MAX_TOKENS,
            extra_body={"ignore_eos": True})
        assert again.choices[0].text == expected[0]
