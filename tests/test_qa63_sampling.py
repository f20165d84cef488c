"""Sampling semantics of the Python API as a vLLM user drives it (63rd QA session): stop
strings of different lengths under min_tokens, fields given None or numpy values,
logit_bias keys written as the OpenAI API's JSON writes them, allowed_token_ids, and
chat()'s continue_final_message / add_generation_prompt / use_tqdm / chat_template_kwargs."""

from __future__ import annotations

import numpy as np
import pytest

from kiln import LLM, SamplingParams
from kiln.errors import RequestError
from kiln.runtime.output_processor import Sequence, _check_stop_strings
from kiln.runtime.request import Request
from tests.test_serve_support import tiny_chat_engine

PROMPT = "Once upon a time, in a land far away, there lived"
FREE = dict(max_tokens=12, temperature=0, ignore_eos=True)
MESSAGES = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "The answer is"}]


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_chat_engine(), device="cpu")


# ---- 1. a stop string searched from its own length back ------------------------------
def test_a_short_stop_string_is_searched_only_in_the_new_text():
    """Before, every stop string was searched from the longest one's length back, so a short
    one lying wholly in the text before (made while min_tokens held stops back) matched."""
    params = SamplingParams(stop=["b", "zzzzzz"])
    seq = Sequence(Request("r", [1], params, 16), 0, "r", None, text="abcdef")
    assert _check_stop_strings(seq, 3) is None  # "def" is new: "b" is not in it
    assert seq.text == "abcdef"
    assert _check_stop_strings(seq, 0) is not None and seq.text == "a"


def test_min_tokens_with_stop_strings_of_different_lengths(llm):
    pieces = list(llm.engine.stream(PROMPT, SamplingParams(**FREE)))
    stop = pieces[0].strip()[-2:]  # in the first token's text only
    assert len(stop) == 2 and stop not in "".join(pieces[1:])
    alone = llm.generate(PROMPT, SamplingParams(**FREE, stop=[stop], min_tokens=2))[0]
    with_long = llm.generate(PROMPT, SamplingParams(**FREE, stop=[stop, "z" * 12],
                                                    min_tokens=2))[0]
    assert alone.text == with_long.text == "".join(pieces)
    assert with_long.finish_reason == "length" and len(with_long.token_ids) == 12


# ---- 2. None and numpy values ---------------------------------------------------------
@pytest.mark.parametrize("name", ["n", "min_tokens", "top_k"])
def test_none_for_a_whole_number_is_a_request_error(name):
    """Before: a TypeError from comparing None with an int."""
    with pytest.raises(RequestError, match=f"^{name} must be a whole number, got None$"):
        SamplingParams(**{name: None})


@pytest.mark.parametrize("name", ["ignore_eos", "include_stop_str_in_output",
                                  "skip_special_tokens"])
@pytest.mark.parametrize("value", [None, "no", 1])
def test_flags_must_be_true_or_false(name, value):
    """Before, "no" was taken as true and None as false."""
    with pytest.raises(RequestError, match=f"^{name} must be True or False"):
        SamplingParams(**{name: value})
    assert getattr(SamplingParams(**{name: np.bool_(True)}), name) is True


def test_num_speculative_tokens_takes_a_numpy_integer():
    assert SamplingParams(num_speculative_tokens=np.int64(2)).num_speculative_tokens == 2


# ---- 3. logit_bias keys ---------------------------------------------------------------
def test_logit_bias_takes_token_ids_as_digits_and_numpy_integers(llm):
    """vLLM takes the OpenAI API's string keys ({"300": 100}); kiln refused them."""
    params = SamplingParams(**FREE, logit_bias={"300": 100, np.int64(7): -5.5})
    assert params.logit_bias == {300: 100.0, 7: -5.5}
    assert llm.generate(PROMPT, params)[0].token_ids == [300] * 12
    for key in ("x", "1.5", 1.0):
        with pytest.raises(RequestError, match="logit_bias keys must be token ids"):
            SamplingParams(logit_bias={key: 1.0})
    with pytest.raises(RequestError, match="token id -3 is not in the vocabulary"):
        SamplingParams(logit_bias={"-3": 1.0})


# ---- 4. allowed_token_ids -------------------------------------------------------------
def test_allowed_token_ids_restrict_sampling(llm):
    allowed = [100, 200, 300, 400]
    out = llm.generate(PROMPT, SamplingParams(max_tokens=16, temperature=1.5, seed=3,
                                              ignore_eos=True, allowed_token_ids=allowed))[0]
    assert set(out.token_ids) <= set(allowed) and len(set(out.token_ids)) > 1
    # Greedy: the most likely allowed token (logprobs are the model's raw ones).
    out = llm.generate(PROMPT, SamplingParams(max_tokens=1, temperature=0, logprobs=0,
                                              allowed_token_ids=allowed))[0]
    full = llm.generate(PROMPT, SamplingParams(max_tokens=1, temperature=0,
                                               logprobs=llm.engine.config.model.vocab_size))[0]
    raw = full.outputs[0].logprobs[0]
    assert out.token_ids == [max(allowed, key=raw.__getitem__)]
    # No other request of the batch is restricted.
    both = llm.generate([PROMPT, PROMPT], [SamplingParams(**FREE, allowed_token_ids=allowed),
                                           SamplingParams(**FREE)])
    assert set(both[0].token_ids) <= set(allowed)
    assert both[1].token_ids == llm.generate(PROMPT, SamplingParams(**FREE))[0].token_ids


@pytest.mark.parametrize("value,words", [
    ([], "allowed_token_ids is empty"), ([-1], "allowed_token_ids: token id -1 is not in"),
    ("5", "allowed_token_ids must be a list of token ids"),
])
def test_allowed_token_ids_of_the_wrong_kind(value, words):
    with pytest.raises(RequestError, match=words):
        SamplingParams(allowed_token_ids=value)


def test_allowed_token_ids_past_the_vocabulary(llm):
    with pytest.raises(RequestError, match=r"allowed_token_ids: token id 10000000 is not in "
                                           r"the vocabulary \(0 to "):
        llm.generate(PROMPT, SamplingParams(max_tokens=2, allowed_token_ids=[3, 10_000_000]))


# ---- 5. chat(): continue_final_message and vLLM's other arguments ---------------------
def test_chat_continues_the_final_message(llm):
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    out = llm.chat(MESSAGES, params, continue_final_message=True)[0]
    prompt = llm.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
    assert prompt.endswith("<|im_start|>assistant\nThe answer is")
    # The same prompt as the template's text cut after the message, without an <|im_end|>.
    written = llm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False)
    cut = written[:written.rindex("The answer is") + len("The answer is")]
    assert out.prompt_token_ids == llm.tokenizer.encode(cut, add_special_tokens=False)
    same = llm.chat(MESSAGES, params, add_generation_prompt=False,
                    continue_final_message=True)[0]
    assert same.token_ids == out.token_ids
    # Text parts are joined as the template reads them.
    parts = [MESSAGES[0], {"role": "assistant",
                           "content": [{"type": "text", "text": "The answer is"}]}]
    assert llm.chat(parts, params, continue_final_message=True)[0].prompt_token_ids == \
        out.prompt_token_ids


def test_chat_takes_vllms_other_arguments(llm):
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    opened = llm.chat(MESSAGES[:1], params, False)[0]  # use_tqdm by position, as in vLLM
    prompt = llm.tokenizer.decode(opened.prompt_token_ids, skip_special_tokens=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    closed = llm.chat(MESSAGES[:1], params, add_generation_prompt=False)[0]
    assert llm.tokenizer.decode(closed.prompt_token_ids, skip_special_tokens=False) == \
        prompt[:-len("<|im_start|>assistant\n")]
    assert llm.chat(MESSAGES[:1], params, chat_template_kwargs={"enable_thinking": False},
                    tools=[])[0].prompt_token_ids == opened.prompt_token_ids
    with pytest.raises(RequestError, match="cannot both be True"):
        llm.chat(MESSAGES, params, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(RequestError, match="chat_template_kwargs must be a dict"):
        llm.chat(MESSAGES, params, chat_template_kwargs=["x"])
