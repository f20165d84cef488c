"""Structured output beyond JSON schemas: a regular expression, a list of choices, an EBNF
grammar (SamplingParams.regex / choice / grammar; vLLM's guided_regex / guided_choice /
guided_grammar and structured_outputs on the server). Random weights: only the grammar
makes these answers match at all."""

from __future__ import annotations

import re

import pytest

from kiln import LLM, SamplingParams
from kiln.errors import RequestError
from tests.test_serve_support import MODEL, tiny_chat_engine

pytest.importorskip("xgrammar")

CHOICES = ["red", "green", "dark blue", 'say "hi"']
GRAMMAR = 'root ::= "(" digit+ ("+" digit+)* ")"\ndigit ::= [0-9]'
GRAMMAR_RE = r"\([0-9]+(\+[0-9]+)*\)"


@pytest.fixture(scope="module")
def tiny():
    return LLM(tiny_chat_engine(), device="cpu")


def test_regex_choice_and_grammar_batched_with_free_requests(tiny):
    cases = [(dict(regex=r"[0-9]{3}-[a-z]{2}"), r"[0-9]{3}-[a-z]{2}"),
             (dict(choice=CHOICES), "|".join(re.escape(c) for c in CHOICES)),
             (dict(grammar=GRAMMAR), GRAMMAR_RE)]
    prompts, params, patterns = [], [], []
    for seed in range(3):
        for fields, pattern in cases:
            prompts.append(f"Answer {seed}:")
            params.append(SamplingParams(max_tokens=40, temperature=1.0, seed=seed, **fields))
            patterns.append(pattern)
    free = [SamplingParams(max_tokens=12, temperature=1.0, seed=s) for s in range(2)]
    outs = tiny.generate(prompts + ["Free 0", "Free 1"], params + free)
    for out, pattern, p in zip(outs, patterns, params):
        if p.grammar is None:  # these languages are finite: the answer always completes
            assert out.finish_reason == "stop", out.text
            assert re.fullmatch(pattern, out.text), (pattern, out.text)
        elif out.finish_reason == "stop":
            assert re.fullmatch(pattern, out.text), out.text
        else:  # a grammar with + may run to max_tokens: a prefix of a sentence
            assert re.fullmatch(r"\([0-9+]*", out.text), out.text
    alone = tiny.generate(["Free 0", "Free 1"], free)
    assert [o.token_ids for o in outs[len(params):]] == [o.token_ids for o in alone]


def test_every_choice_is_reachable(tiny):
    seen = {o.text for o in tiny.generate(
        ["Pick:"] * 24, [SamplingParams(max_tokens=8, temperature=1.5, seed=s, choice=CHOICES)
                        for s in range(24)])}
    assert seen <= set(CHOICES) and len(seen) >= 2, seen


@pytest.mark.parametrize("fields,words", [
    (dict(regex="[0-9"), "regex: the regular expression does not compile"),
    (dict(grammar="root ::= nothing_here"), "grammar: the grammar does not compile"),
    (dict(choice=[]), "choice must be a list of non-empty strings"),
    (dict(choice=["a", ""]), "choice must be a list of non-empty strings"),
    (dict(regex=""), "regex must be a non-empty string"),
    (dict(regex="a", choice=["a"]), "regex and choice both constrain the text"),
    (dict(json_schema={"type": "object"}, grammar=GRAMMAR), "json_schema and grammar"),
])
def test_bad_constraints_are_request_errors(tiny, fields, words):
    with pytest.raises(RequestError, match=re.escape(words)):
        tiny.generate("x", SamplingParams(max_tokens=4, **fields))


@pytest.mark.parametrize("extra,pattern", [
    ({"guided_choice": CHOICES}, "|".join(re.escape(c) for c in CHOICES)),
    ({"guided_regex": "[a-c]{2}[0-9]"}, "[a-c]{2}[0-9]"),
    ({"guided_grammar": GRAMMAR}, GRAMMAR_RE),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, "yes|no"),
    ({"structured_outputs": {"regex": "x+y"}}, "x+y"),
])
def test_openai_guided_fields(client, extra, pattern):
    for seed in range(2):
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Pick"}], max_tokens=40,
            seed=seed, extra_body=extra)
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        if finish == "stop":
            assert re.fullmatch(pattern, text), (extra, text)
        else:
            assert "guided_grammar" in extra or "x+y" in pattern, (extra, text)
    stream = client.completions.create(model=MODEL, prompt="Pick", max_tokens=40, seed=3,
                                       stream=True, extra_body=extra)
    pieces = [c.choices[0] for c in stream if c.choices]
    if pieces[-1].finish_reason == "stop":
        assert re.fullmatch(pattern, "".join(p.text for p in pieces)), extra
