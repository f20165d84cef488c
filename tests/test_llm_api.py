"""The Python API as a QA pass used it (42nd session): streamed text against the final
text (stop strings, other calls between pieces), what SamplingParams and BeamSearchParams
take, bad words, the stopping token in the text, and closing an LLM. Each mistake is a
RequestError / KilnError for that call only."""

from __future__ import annotations

import asyncio
import gc

import openai
import pytest

from kiln import LLM, SamplingParams
from kiln.build import build
from kiln.config import BuildConfig
from kiln.errors import KilnError, PromptTooLongError, RequestError
from kiln.runtime.beam_search import BeamSearchParams
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.serve import AsyncLLM
from tests.test_serve_support import MODEL, tiny_chat_checkpoint, tiny_chat_engine

PROMPT = "The capital of France is a city that"
FREE = dict(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_chat_engine(), device="cpu")


def _stop_across_tokens(llm: LLM) -> tuple[str, str]:
    """A stop string that starts inside one generated token's text and ends in the next
    one's, and the text before it (what the request's final text is)."""
    pieces = list(llm.engine.stream(PROMPT, SamplingParams(**FREE)))
    full, at = "".join(pieces), 0
    for piece, after in zip(pieces, pieces[1:]):
        stop = full[at + 1:at + len(piece) + 1]
        if len(piece) >= 2 and after and full.find(stop) == at + 1:
            return stop, full[:at + 1]
        at += len(piece)
    raise AssertionError(f"no token of {pieces} takes a stop string across its end")


# ---- 1. streamed text never shows part of a stop string the final text drops ----------
def test_stream_holds_back_what_may_become_a_stop_string(llm):
    stop, final = _stop_across_tokens(llm)
    params = SamplingParams(**FREE, stop=[stop])
    assert llm.generate(PROMPT, params)[0].text == final
    pieces = list(llm.engine.stream(PROMPT, params))
    assert "".join(pieces) == final


def test_async_generate_text_only_grows(llm):
    stop, final = _stop_across_tokens(llm)
    front = AsyncLLM(LLMEngine(tiny_chat_engine(), RuntimeConfig(device="cpu")))

    async def run() -> list[str]:
        return [o.text async for o in front.generate(PROMPT, SamplingParams(**FREE,
                                                                            stop=[stop]))]
    try:
        texts = asyncio.run(run())
    finally:
        front.shutdown()
    assert texts[-1] == final
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts


# ---- 2. SamplingParams: the types inside its lists, token ids in the vocabulary -------
@pytest.mark.parametrize("options,words", [
    (dict(stop=5), "stop must be a string or a list of strings, got 5"),
    (dict(stop=["a", 5]), "stop must be a string or a list of strings"),
    (dict(bad_words=[3]), "bad_words must be a string or a list of strings"),
    (dict(stop_token_ids="a"), "stop_token_ids must be a list of token ids"),
    (dict(stop_token_ids=5), "stop_token_ids must be a list of token ids"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids must be a list of token ids"),
    (dict(stop_token_ids=[-1]), "stop_token_ids: token id -1 is not in the vocabulary"),
    (dict(logit_bias={5: "a"}), "logit_bias values must be in"),
    (dict(logit_bias=[1, 2]), "logit_bias must be a dict"),
])
def test_sampling_lists_of_the_wrong_kind(options, words):
    with pytest.raises(RequestError, match=words.replace("[", r"\[")):
        SamplingParams(**options)


def test_params_set_after_construction_fail_when_added(llm):
    good = SamplingParams(max_tokens=4, temperature=0)
    bad = SamplingParams(max_tokens=4, temperature=0)
    bad.stop_token_ids = 5  # type: ignore[assignment]
    with pytest.raises(RequestError, match="stop_token_ids must be a list"):
        llm.generate(["a", "b"], [good, bad])
    assert not llm.engine.has_unfinished()
    vocab = llm.engine.config.model.vocab_size
    for options, words in ((dict(stop_token_ids=[vocab]), f"stop_token_ids: token id {vocab} "),
                           (dict(logit_bias={vocab + 5: 1.0}), f"logit_bias: token id "
                                                                f"{vocab + 5} ")):
        with pytest.raises(RequestError, match=words + r"is not in the vocabulary \(0 to "):
            llm.generate("a", SamplingParams(max_tokens=4, **options))


def test_a_stop_string_assigned_later_is_one_string(llm):
    free = llm.generate(PROMPT, SamplingParams(**FREE))[0].text
    params = SamplingParams(**FREE)
    params.stop = stop = free[5:9]  # type: ignore[assignment]
    out = llm.generate(PROMPT, params)[0]
    assert out.outputs[0].stop_reason == stop and out.text == free[:free.index(stop)]


def test_a_bad_request_ends_no_other_async_request(llm):
    """Before, SamplingParams with stop_token_ids="a" was accepted and failed the engine's
    step, ending every request of it."""
    front = AsyncLLM(LLMEngine(tiny_chat_engine(), RuntimeConfig(device="cpu")))
    want = llm.generate(PROMPT, SamplingParams(**FREE))[0].text
    bad = SamplingParams(max_tokens=8)
    bad.stop_token_ids = "a"  # type: ignore[assignment]

    async def run() -> str:
        async def collect() -> list:
            return [o async for o in front.generate(PROMPT, SamplingParams(**FREE))]

        good = asyncio.ensure_future(collect())
        await asyncio.sleep(0.05)  # running in the engine meanwhile
        with pytest.raises(RequestError, match="stop_token_ids"):
            await front.submit([("x", bad, "bad-1")])
        with pytest.raises(RequestError, match="stop_token_ids"):
            async for _ in front.generate("x", bad):
                pass
        return (await good)[-1].text
    try:
        assert asyncio.run(run()) == want
    finally:
        front.shutdown()


# ---- 3. bad words: as written and after a space -----------------------------------------
def test_a_bad_word_without_a_leading_space_is_banned(llm):
    tok = llm.tokenizer
    free = llm.generate(PROMPT, SamplingParams(**FREE))[0]
    # A generated token whose text starts with no space and is a whole word's encoding.
    token, word = next((t, w) for t in free.token_ids
                       if (w := tok.decode([t])) and w == w.strip()
                       and tok.encode(w, add_special_tokens=False) == [t])
    out = llm.generate(PROMPT, SamplingParams(**FREE, bad_words=[word]))[0]
    assert token not in out.token_ids
    spaced = tok.encode(" " + word, add_special_tokens=False)
    if len(spaced) == 1:  # the spaced form is banned as before
        assert spaced[0] not in out.token_ids


# ---- 4. a stream read half-way while other calls run the engine; n > 1 -------------------
def test_a_stream_keeps_its_text_across_other_calls(llm):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    full = llm.generate("Hello", params)[0].text
    stream = llm.engine.stream("Hello", params)
    first = next(stream)
    assert len(llm.generate("The capital", SamplingParams(max_tokens=5, temperature=0))) == 1
    assert llm.beam_search("Hi", BeamSearchParams(beam_width=2, max_tokens=3))[0].sequences
    assert first + "".join(stream) == full
    assert not llm.engine.has_unfinished()


def test_a_stream_of_several_sequences_is_refused(llm):
    with pytest.raises(RequestError, match="n=2 asks for 2"):
        llm.engine.stream("Hello", SamplingParams(n=2))
    assert not llm.engine.has_unfinished()


# ---- 5. beam search: its params and the length, up front --------------------------------
@pytest.mark.parametrize("options,words", [
    (dict(beam_width="4"), "beam_width must be a whole number >= 1, got '4'"),
    (dict(beam_width=2.5), "beam_width must be a whole number >= 1, got 2.5"),
    (dict(max_tokens=None), "max_tokens must be a whole number >= 1, got None"),
    (dict(num_return_sequences=1.0), "num_return_sequences must be a whole number"),
    (dict(length_penalty=float("nan")), "length_penalty must be a finite number, got nan"),
    (dict(early_stopping=1), "early_stopping must be True, False or 'never'"),
])
def test_beam_search_params_of_the_wrong_kind(options, words):
    with pytest.raises(RequestError, match=words):
        BeamSearchParams(**options)


def test_beam_search_checks_the_length_up_front(llm):
    limit = llm.engine.max_seq_len
    prompt = list(range(10, 10 + limit - 5))
    with pytest.raises(RequestError, match=rf"prompt \({limit - 5} tokens\) \+ max_tokens "
                                           rf"\(10\) exceeds max_seq_len \({limit}\)"):
        llm.beam_search(prompt, BeamSearchParams(beam_width=2, max_tokens=10))
    params = BeamSearchParams(beam_width=2, max_tokens=2)
    params.beam_width = "2"  # type: ignore[assignment]
    with pytest.raises(RequestError, match="beam_width must be a whole number"):
        llm.beam_search("Hi", params)
    assert not llm.engine.has_unfinished()


def test_sequence_logits_checks_the_sequence(llm):
    """LLMEngine.sequence_logits (perplexity, evaluation): a sequence past max_seq_len, an
    empty one or ids outside the vocabulary are RequestErrors (were an IndexError from the
    KV gather), and the longest allowed one still scores every position."""
    engine = llm.engine
    limit, vocab = engine.max_seq_len, engine.config.model.vocab_size
    with pytest.raises(PromptTooLongError, match=rf"{limit + 1} tokens; this engine's "
                                                 rf"max_seq_len is {limit}"):
        engine.sequence_logits([5] * (limit + 1))
    with pytest.raises(RequestError, match="empty"):
        engine.sequence_logits([])
    with pytest.raises(RequestError, match=r"in \[0, "):
        engine.sequence_logits([5, vocab])
    assert engine.sequence_logits([7] * limit).shape == (limit, vocab)
    assert not engine.has_unfinished() and engine.kv.num_used_blocks == 0


# ---- 8. the token that stops a request stays out of its text (as in vLLM) ----------------
def test_the_stopping_token_stays_out_of_the_text(llm):
    eos = llm.engine.eos_token_ids[0]
    eos_text = llm.tokenizer.decode([eos], skip_special_tokens=False)
    forced = dict(max_tokens=8, temperature=0, min_tokens=2, logit_bias={eos: 100.0},
                  skip_special_tokens=False)
    out = llm.generate(PROMPT, SamplingParams(**forced))[0]
    assert out.token_ids[-1] == eos and len(out.token_ids) == 3 and out.finish_reason == "stop"
    assert eos_text not in out.text and out.text == llm.generate(
        PROMPT, SamplingParams(max_tokens=2, temperature=0))[0].text
    kept = llm.generate(PROMPT, SamplingParams(**forced, include_stop_str_in_output=True))[0]
    assert kept.text == out.text + eos_text
    free = llm.generate(PROMPT, SamplingParams(**FREE))[0]
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    stopped = llm.generate(PROMPT, SamplingParams(**FREE, stop_token_ids=[stop_id]))[0]
    assert stopped.token_ids == free.token_ids[:first + 1] and stopped.text == llm.generate(
        PROMPT, SamplingParams(**{**FREE, "max_tokens": first}))[0].text


def test_the_server_leaves_the_stopping_token_out_too(llm, server):
    eos = llm.engine.eos_token_ids[0]
    body = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logit_bias={
        str(eos): 100}, extra_body={"min_tokens": 2, "skip_special_tokens": False})
    want = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0, min_tokens=2,
                                               logit_bias={eos: 100.0},
                                               skip_special_tokens=False))[0].text
    assert llm.tokenizer.decode([eos], skip_special_tokens=False) not in want
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    assert client.completions.create(**body).choices[0].text == want
    chunks = client.completions.create(**body, stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want


# ---- 6. closing an LLM --------------------------------------------------------------------
def test_closed_llm_says_so(llm):
    closed = LLM(tiny_chat_engine(), device="cpu")
    closed.close()
    closed.close()  # again: nothing
    for call in (lambda: closed.generate("Hi"), lambda: closed.engine.stream("Hi"),
                 lambda: closed.beam_search("Hi"), lambda: closed.chat(
                     [{"role": "user", "content": "Hi"}])):
        with pytest.raises(KilnError, match="this LLM is closed"):
            call()


def test_close_releases_a_multi_rank_engine(tmp_path):
    engine = build(tiny_chat_checkpoint(), tmp_path / "tp2", BuildConfig(
        dtype="float32", max_seq_len=256, max_batch_size=16, max_num_tokens=512, tp_size=2),
        progress=False)
    params = SamplingParams(max_tokens=4, temperature=0)
    with LLM(engine, device="cpu") as llm:
        want = llm.generate("Hello", params)[0].text
        with pytest.raises(KilnError, match=r"call its close\(\)"):
            LLM(engine, device="cpu")
    with pytest.raises(KilnError, match="this LLM is closed"):
        llm.generate("Hello", params)
    again = LLM(engine, device="cpu")  # its process group was released
    assert again.generate("Hello", params)[0].text == want
    del again
    gc.collect()  # dropped without close(): closed when the next LLM loads
    last = LLM(engine, device="cpu")
    try:
        assert last.generate("Hello", params)[0].text == want
    finally:
        last.close()
