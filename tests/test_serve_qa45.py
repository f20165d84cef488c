"""Serving QA (45th session): a constraint that allows no answer is refused when the
request arrives, and one that reaches a dead end ends that answer with its text so far
(finish_reason "abort", stop_reason saying why; it used to emit token 0 until max_tokens,
billed), with and without speculative decoding, streamed and not; a draft model without
tokenizer files is accepted on its vocabulary size (as vLLM) with a warning that says so;
the Triton models' errors name the input (text_input, num_return_sequences)."""

from __future__ import annotations

import importlib
import json
import logging
import sys

import httpx
import numpy as np
import pytest

from kiln import LLM, SamplingParams
from kiln.errors import RequestError
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from tests.test_serve_support import MODEL, tiny_chat_engine

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}
EMPTY = r"[^\s\S]"  # no text matches: xgrammar's first mask is empty
DEAD = r"ab[^\s\S]"  # "ab", then nothing: only generation finds the dead end
NO_CHARACTER = r"root ::= [^\x00-\U0010ffff]"  # EBNF of no text
REFUSED = "regex: the regular expression allows no answer"
DEAD_END = "regex: the regular expression allows no token after the text so far"


# ---- 1. constraints without an answer -------------------------------------------------
@pytest.fixture(scope="module", params=[None, NGRAM], ids=["plain", "ngram"])
def tiny(request):
    pytest.importorskip("xgrammar")
    return LLM(tiny_chat_engine(), device="cpu", speculative_config=request.param)


def test_a_constraint_without_an_answer_is_refused(tiny):
    with pytest.raises(RequestError, match=REFUSED):
        tiny.generate("x", SamplingParams(max_tokens=8, regex=EMPTY))
    with pytest.raises(RequestError, match="grammar: the grammar allows no answer"):
        tiny.generate("x", SamplingParams(max_tokens=8, grammar=NO_CHARACTER))


def test_a_dead_end_ends_that_answer_only(tiny):
    free = [SamplingParams(max_tokens=12, temperature=t, seed=s, ignore_eos=True)
            for t, s in ((0.0, 0), (1.0, 1))]
    dead = [SamplingParams(max_tokens=8, temperature=t, seed=3, regex=DEAD, logprobs=1)
            for t in (0.0, 1.0)]
    schema = SamplingParams(max_tokens=8, json_schema={"type": "object", "properties": {
        "a": {"type": "string", "pattern": EMPTY}}, "required": ["a"]})
    prompts = ["Answer:", "Again:", "Free one", "Free two", "JSON:"]
    outs = tiny.generate(prompts, [*dead, *free, schema])
    for out in outs[:2]:
        assert (out.text, out.finish_reason) == ("ab", "abort"), out
        assert out.outputs[0].stop_reason == DEAD_END
        assert 1 <= len(out.token_ids) <= 2 and 0 not in out.token_ids
        assert len(out.outputs[0].logprobs) == len(out.token_ids)
        assert tiny.engine.tokenizer.decode(out.token_ids) == "ab"
    out = outs[4]
    assert out.text == '{"a": "' and out.finish_reason == "abort", out
    assert out.outputs[0].stop_reason.startswith("json_schema: the JSON schema allows no ")
    alone = tiny.generate(prompts[2:4], free)
    assert [o.token_ids for o in outs[2:4]] == [o.token_ids for o in alone]
    assert tiny.engine.kv.num_used_blocks == 0


@pytest.fixture(scope="module")
def server():
    """A server over a speculating (ngram) engine: constrained requests decode plainly
    beside speculating ones."""
    pytest.importorskip("xgrammar")
    from kiln.serve import AsyncLLM, ServerConfig, ServerThread, build_app
    from tests.test_serve_support import Served

    engine = LLMEngine(tiny_chat_engine(), RuntimeConfig(device="cpu",
                                                         speculative_config=NGRAM))
    llm = AsyncLLM(engine)
    try:
        with ServerThread(build_app(llm, ServerConfig(served_model_name=MODEL))) as running:
            yield Served(running.url, llm)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("route,extra,param", [
    ("chat/completions", {"guided_regex": EMPTY}, "guided_regex"),
    ("completions", {"structured_outputs": {"regex": EMPTY}}, "structured_outputs"),
    ("chat/completions", {"guided_grammar": NO_CHARACTER}, "guided_grammar"),
])
def test_openai_refuses_a_constraint_without_an_answer(server, route, extra, param):
    body = {"model": MODEL, "max_tokens": 8, **extra,
            **({"prompt": "x"} if route == "completions" else
               {"messages": [{"role": "user", "content": "x"}]})}
    r = httpx.post(f"{server.v1}/{route}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "allows no answer" in error["message"], error


def test_openai_dead_end_whole_and_streamed(server):
    for route, body in (("chat/completions", {"messages": [{"role": "user",
                                                           "content": "Say"}]}),
                        ("completions", {"prompt": "Say"})):
        body = {"model": MODEL, "max_tokens": 8, "temperature": 0, "guided_regex": DEAD,
                **body}
        reply = httpx.post(f"{server.v1}/{route}", json=body, timeout=60).json()
        choice = reply["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        assert (text, choice["finish_reason"]) == ("ab", "abort"), reply
        assert choice["stop_reason"] == DEAD_END
        assert 1 <= reply["usage"]["completion_tokens"] <= 2
        chunks = []
        with httpx.stream("POST", f"{server.v1}/{route}", timeout=60, json={
                **body, "stream": True, "stream_options": {"include_usage": True}}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        pieces = [c["delta"].get("content") or "" if "delta" in c else c["text"]
                  for c in choices]
        assert "".join(pieces) == "ab"
        assert (choices[-1]["finish_reason"], choices[-1]["stop_reason"]) == ("abort",
                                                                             DEAD_END)
        cached = "prompt_tokens_details"  # the stream reads the prompt from the prefix cache
        assert {k: v for k, v in chunks[-1]["usage"].items() if k != cached} == \
            {k: v for k, v in reply["usage"].items() if k != cached}
    plain = httpx.post(f"{server.v1}/completions", timeout=60, json={
        "model": MODEL, "prompt": "Say", "max_tokens": 4, "stop": ["zzz"]}).json()
    assert plain["choices"][0]["stop_reason"] is None  # vLLM's field, null when unused


# ---- 2. a draft model without tokenizer files ----------------------------------------
def test_draft_without_tokenizer_is_checked_by_vocabulary_size(tmp_path, caplog):
    target = tiny_chat_engine()
    draft = tmp_path / "draft"
    draft.mkdir()
    for name in ("engine.json", "rank0.safetensors"):  # the target's weights, no tokenizer
        (draft / name).symlink_to(target / name)
    plain = LLM(target, device="cpu").generate(
        "The capital of France is", SamplingParams(max_tokens=10, temperature=0))[0]
    with caplog.at_level(logging.WARNING, logger="kiln"):
        llm = LLM(target, device="cpu", speculative_config={
            "method": "draft_model", "model": str(draft), "num_speculative_tokens": 2})
    warned = [r.getMessage() for r in caplog.records if "no tokenizer files" in r.getMessage()]
    assert len(warned) == 1 and "only its vocabulary size (49152 tokens" in warned[0]
    out = llm.generate("The capital of France is",
                       SamplingParams(max_tokens=10, temperature=0))[0]
    assert out.token_ids == plain.token_ids
    assert llm.engine.stats()["spec_acceptance_rate"] > 0.95  # itself: every draft kept


# ---- 3. Triton: errors name the input ------------------------------------------------
def test_generate_inputs_must_be_utf8():
    from kiln.serve.generate_params import parse_generate_request

    with pytest.raises(RequestError, match=r"^text_input must be UTF-8 text \(invalid "
                                           r"start byte: 0xff at byte 0\)$"):
        parse_generate_request({"text_input": [b"\xff\xfe abc"]})  # as a BYTES tensor
    with pytest.raises(RequestError, match=r"^stop must be UTF-8 text"):
        parse_generate_request({"text_input": [b"hi"], "stop": [b"ok", b"a\xc3"]})


@pytest.fixture
def triton_models():
    """kiln's Triton model modules under the stand-in triton_python_backend_utils of
    test_serve_triton_repo, unloaded afterwards."""
    from tests.test_serve_triton_repo import _fake_pb_utils

    names = ("kiln.serve.triton_model", "kiln.serve.triton_trtllm")
    saved = {name: sys.modules.pop(name, None) for name in names}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
        yield [importlib.import_module(name) for name in names]
        for name, module in saved.items():
            sys.modules.pop(name, None)
            if module is not None:
                sys.modules[name] = module


def _error_of(sender) -> str:
    [(response, flags)] = sender.responses
    assert flags == 1 and response.error is not None
    return response.error.message()


def test_triton_models_name_the_input(triton_models):
    from kiln.tokenizer import Tokenizer
    from tests.test_serve_triton_repo import FakeRequest

    kiln_model, trtllm = triton_models
    request = FakeRequest(text_input=np.array([b"\xff\xfe abc"], dtype=np.object_))
    object.__new__(kiln_model.TritonPythonModel).execute([request])  # refused before use
    assert _error_of(request.sender).startswith("text_input must be UTF-8 text")

    def tokens(**extra) -> FakeRequest:
        return FakeRequest(input_ids=np.array([[1, 2, 3]], np.int32),
                           request_output_len=np.array([[4]], np.int32),
                           **{k: np.array([[v]], np.int32) for k, v in extra.items()})

    model = object.__new__(trtllm.TensorRTLLMModel)
    for extra, words in (({"num_return_sequences": 0}, "num_return_sequences must be at "
                          "least 1, got 0"),
                         ({"runtime_top_k": -5}, "runtime_top_k (the ensemble's top_k) must"
                          " be -1, 0 (off) or positive, got -5")):
        request = tokens(**extra)
        model.execute([request])
        assert _error_of(request.sender) == words
    pre = object.__new__(trtllm.PreprocessingModel)
    pre.tokenizer = Tokenizer.from_engine(tiny_chat_engine())
    [response] = pre.execute([FakeRequest(
        QUERY=np.array([[b"\xff abc"]], dtype=np.object_),
        REQUEST_OUTPUT_LEN=np.array([[4]], np.int32))])
    assert response.error.message().startswith(
        "preprocessing: QUERY (the ensemble's text_input) must be UTF-8 text")
