"""The Python API as a vLLM user drives it (62nd QA session): several stop strings that
match in one token's text, SamplingParams fields left at None as vLLM takes them, and
generate / chat called with vLLM's keyword `sampling_params`."""

from __future__ import annotations

import pytest

from kiln import LLM, SamplingParams
from kiln.runtime.output_processor import Sequence, _check_stop_strings
from kiln.runtime.request import Request
from tests.test_serve_support import tiny_chat_engine

PROMPT = "Once upon a time, in a land far away, there lived"
FREE = dict(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_chat_engine(), device="cpu")


# ---- 1. the earliest of several stop strings ends the text ---------------------------
@pytest.mark.parametrize("include", [False, True])
def test_the_earliest_stop_string_wins_within_one_token(llm, include):
    """Before, the stop strings were tried in list order: with stop=[later, earlier] both
    in one new token's text, the text was cut at the later one and kept the earlier."""
    pieces = list(llm.engine.stream(PROMPT, SamplingParams(**FREE)))
    full, at = "".join(pieces), 0
    for piece in pieces:  # a token whose text holds two characters new to the text
        early, late = piece.strip()[:1], piece.strip()[-1:]
        if early and early != late and early not in full[:at] and late not in full[:at]:
            break
        at += len(piece)
    else:
        raise AssertionError(f"no token of {pieces} has two new characters")
    stops = [late, early]  # the later match listed first
    out = llm.generate(PROMPT, SamplingParams(**FREE, stop=stops,
                                              include_stop_str_in_output=include))[0]
    end = full.index(early) + (1 if include else 0)
    assert out.text == full[:end]
    assert out.outputs[0].stop_reason == early
    assert "".join(llm.engine.stream(PROMPT, SamplingParams(
        **FREE, stop=stops, include_stop_str_in_output=include))) == out.text


@pytest.mark.parametrize("text,stops,cut,reason", [
    ("abcdef", ["e", "c"], "ab", "c"),
    ("abcdef", ["cd", "c"], "ab", "cd"),  # same place: the one listed first
    ("abcdef", ["x", "de", "b"], "a", "b"),
])
def test_stop_strings_cut_at_the_first_match(text, stops, cut, reason):
    params = SamplingParams(stop=stops)
    seq = Sequence(Request("r", [1], params, 16), 0, "r", None, text=text)
    assert _check_stop_strings(seq, 0) is not None
    assert (seq.text, seq.request.stop_reason) == (cut, reason)


# ---- 2. None where vLLM takes None --------------------------------------------------
def test_word_lists_take_none_as_vllm_does(llm):
    params = SamplingParams(**FREE, stop=None, stop_token_ids=None, bad_words=None)
    assert (params.stop, params.stop_token_ids, params.bad_words) == ([], [], [])
    assert llm.generate(PROMPT, params)[0].token_ids == \
        llm.generate(PROMPT, SamplingParams(**FREE))[0].token_ids


# ---- 3. vLLM's keyword for the parameters -------------------------------------------
def test_generate_and_chat_take_the_sampling_params_keyword(llm):
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    expected = llm.generate(PROMPT, params)[0].token_ids
    assert llm.generate(PROMPT, sampling_params=params)[0].token_ids == expected
    assert llm.generate([PROMPT], params=params)[0].token_ids == expected  # kiln's name
    messages = [{"role": "user", "content": "Hi"}]
    assert llm.chat(messages, sampling_params=params)[0].token_ids == \
        llm.chat(messages, params)[0].token_ids
    assert len(llm.chat(messages, sampling_params=params)[0].token_ids) == 3
    with pytest.raises(TypeError, match="sampling_params or params, not both"):
        llm.generate(PROMPT, params, params=params)


# ---- 4. numpy whole numbers, which validate() accepts, also run ----------------------
def test_a_numpy_seed_reproduces_as_an_int_seed(llm):
    """Before, seed=np.int64(3) passed validate() and then overflowed (OverflowError)
    wrapping the seed to 64 bits when the request was added."""
    import numpy as np

    def tokens(seed) -> list[list[int]]:
        params = SamplingParams(max_tokens=4, temperature=1.0, n=2, seed=seed, ignore_eos=True)
        return [c.token_ids for c in llm.generate(PROMPT, params)[0].outputs]

    for seed in (np.int64(3), np.int32(3), np.uint8(3)):
        assert tokens(seed) == tokens(3)
    params = SamplingParams(seed=np.int64(-7), max_tokens=np.int64(5), n=np.int32(2))
    assert [type(v) for v in (params.seed, params.max_tokens, params.n)] == [int, int, int]
