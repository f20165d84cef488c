"""Serving QA (63rd session): the OpenAI routes' output as OpenAI / vLLM clients read it,
against a real kiln server with the openai client."""

from __future__ import annotations

import math
import re

import pytest

from tests.test_serve_support import MODEL

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "user", "content": "Hi"}]
CALL = '<tool_call>{"name": "f", "arguments": {"a": "晴"}}</tool_call>'


def _streamed_message(client, **request) -> tuple[str | None, list, list]:
    content, calls, finishes = "", [], []
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            finishes += [choice.finish_reason] if choice.finish_reason else []
    return content or None, calls, finishes


@pytest.mark.parametrize("answer,content", [
    (f" Hi {CALL} bye", " Hi  bye"),  # the text after the call was lost in streams
    (f"Hi\n{CALL}\n{CALL}", "Hi"),  # the stream sent the newline the message strips
    (f"  {CALL}\n", None),
])
def test_streamed_content_around_tool_calls_is_the_message_content(client, answer, content):
    """tool_choice "auto": a free answer (forced here with a regex) with text around
    tagged calls streams the same content as the whole message, nothing lost or added."""
    request = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=80, temperature=0,
                   extra_body={"guided_regex": re.escape(answer)})
    whole = client.chat.completions.create(**request).choices[0]
    streamed, calls, finishes = _streamed_message(client, **request)
    assert streamed == whole.message.content == content
    assert finishes == [whole.finish_reason] == ["tool_calls"]
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


@pytest.mark.parametrize("how", [
    {"tool_choice": "required"},
    {"extra_body": {"guided_regex": re.escape(f"Hi {CALL}")}},  # "auto", read from the text
])
def test_streamed_tool_calls_keep_their_logprobs(client, how):
    """logprobs with tool calls: the stream's chunks carry a logprob for every token, as
    the whole response does (a forced call's stream had none, a free one's lacked the
    last token's)."""
    request = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=40, temperature=0,
                   logprobs=True, top_logprobs=1, **how)
    reply = client.chat.completions.create(**request)
    whole = reply.choices[0]
    assert whole.finish_reason == "tool_calls"
    assert len(whole.logprobs.content) == reply.usage.completion_tokens
    streamed = [entry for chunk in client.chat.completions.create(**request, stream=True)
                for choice in chunk.choices if choice.logprobs
                for entry in choice.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole.logprobs.content]


def test_best_of_ranks_by_logprob_per_token(client):
    """OpenAI's best_of returns the candidate with the highest log probability per token;
    ranking by the cumulative logprob put the shortest first (here an answer that is only
    an EOS, over ones of 6 tokens). The same seeds: the candidates are the engine's n=4."""
    discriminating = 0
    for seed in range(6, 10):
        request = dict(model=MODEL, prompt="Hello", temperature=1.0, max_tokens=6, seed=seed,
                       extra_body={"allowed_token_ids": [81, 82, 2]})  # "a", "b", EOS
        every = client.completions.create(**request, n=4, logprobs=0).choices
        total = [math.fsum(c.logprobs.token_logprobs) for c in every]
        mean = [t / len(c.logprobs.tokens) for t, c in zip(total, every)]
        best = client.completions.create(**request, n=1, best_of=4).choices
        assert [c.index for c in best] == [0]
        assert best[0].text in {c.text for c, m in zip(every, mean) if m > max(mean) - 1e-4}
        discriminating += every[total.index(max(total))].text != best[0].text
    assert discriminating  # the cumulative ranking picks another candidate for some seeds


@pytest.mark.parametrize("parallel", [None, True, False])
def test_parallel_tool_calls_false_keeps_the_first_call(client, parallel):
    """OpenAI's parallel_tool_calls: false asks for at most one call (it was ignored)."""
    two = CALL + "\n" + CALL.replace("晴", "雨")
    extra = {"guided_regex": re.escape(two)}
    if parallel is not None:
        extra["parallel_tool_calls"] = parallel
    request = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=80, temperature=0,
                   extra_body=extra)
    whole = client.chat.completions.create(**request).choices[0]
    args = [c.function.arguments for c in whole.message.tool_calls]
    assert args == (['{"a": "晴"}'] if parallel is False else ['{"a": "晴"}', '{"a": "雨"}'])
    _, calls, _ = _streamed_message(client, **request)
    assert [c.function.arguments for c in calls] == args


def test_usage_counts_the_prompt_tokens_read_from_the_prefix_cache(client):
    """usage.prompt_tokens_details.cached_tokens, as OpenAI reports it: a prompt sent again
    reads its full blocks from the prefix cache (it was missing)."""
    prompt = "The prefix cache test: " + "one two three four five six seven eight " * 12
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2).usage
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2).usage
    assert first.prompt_tokens == again.prompt_tokens > 64
    assert first.prompt_tokens_details.cached_tokens < again.prompt_tokens_details.cached_tokens
    assert again.prompt_tokens_details.cached_tokens >= again.prompt_tokens - 16
    chat = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=2)
    whole = client.chat.completions.create(**chat).usage
    chunks = list(client.chat.completions.create(**chat, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == whole.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= whole.prompt_tokens - 16
