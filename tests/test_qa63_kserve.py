"""QA of the KServe v2 `infer` tensors and TensorRT-LLM's token model: malformed tensor
fields are 400s that say what is wrong (not 500s, not silently misread), and word lists
with ids outside the vocabulary are an error response (not an exception out of execute,
not an id silently dropped)."""

from __future__ import annotations

import sys

import httpx
import numpy as np
import pytest

from tests.test_serve_qa45 import triton_models  # noqa: F401 (a fixture)
from tests.test_serve_support import MODEL, tiny_chat_engine

TEXT = {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["Hi"]}
MAX = {"name": "max_tokens", "datatype": "INT32", "shape": [1], "data": [2]}


@pytest.mark.parametrize("body, words", [
    ({"inputs": [TEXT, MAX], "outputs": [{"name": "text_output", "parameters": [1]}]},
     "output 'text_output': parameters must be an object"),
    ({"inputs": [{**TEXT, "parameters": ["binary_data_size", 6]}, MAX]},
     "input 'text_input': parameters must be an object"),
    ({"inputs": [{**TEXT, "datatype": ["BYTES"]}, MAX]},
     "input 'text_input' must be BYTES, got datatype ['BYTES']"),
    ({"inputs": [TEXT, MAX], "outputs": "text_output"}, "outputs must be a list of tensors"),
    ({"inputs": [TEXT, MAX], "outputs": {"name": "text_output"}},
     "outputs must be a list of tensors"),
    ({"inputs": [{**TEXT, "shape": [True]}, MAX]}, "shape must be a list of sizes"),
])
def test_malformed_tensor_fields_are_400(server, body, words):
    reply = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == words or words in reply.json()["error"]


@pytest.mark.parametrize("body, words", [
    ({"inputs": [TEXT, MAX], "parameters": {"binary_data_output": "false"}},
     "binary_data_output must be true or false, got 'false'"),
    ({"inputs": [TEXT, MAX], "outputs": [{"name": "text_output",
                                          "parameters": {"binary_data": 0}}]},
     "binary_data must be true or false, got 0"),
])
def test_binary_output_flags_must_be_booleans(server, body, words):
    """"false" used to be read as bool("false") == True: a binary reply the client had
    asked not to get."""
    reply = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == words


def test_binary_output_flags_still_work(server):
    url = f"{server.url}/v2/models/{MODEL}/infer"
    binary = httpx.post(url, json={"inputs": [TEXT, MAX],
                                   "parameters": {"binary_data_output": True}}, timeout=60)
    assert binary.status_code == 200 and "inference-header-content-length" in binary.headers
    plain = httpx.post(url, json={"inputs": [TEXT, MAX], "parameters": {
        "binary_data_output": True}, "outputs": [{"name": "text_output",
                                                  "parameters": {"binary_data": False}}]},
                       timeout=60)
    assert plain.status_code == 200, plain.text
    assert plain.json()["outputs"][0]["data"][0].startswith("Hi")


# ---- TensorRT-LLM's tensorrt_llm model ------------------------------------------------
@pytest.fixture
def trtllm(triton_models):  # noqa: F811
    """kiln.serve.triton_trtllm under test_serve_triton_repo's stand-in for Triton's
    triton_python_backend_utils, unloaded afterwards."""
    return triton_models[1]


def _initialized(trtllm, tmp_path):
    """A tensorrt_llm model over the tiny engine, initialized as Triton does."""
    from kiln.serve import trtllm_contract as contract
    from tests.test_serve_triton_repo import _model_config_json

    config = tmp_path / "config.pbtxt"
    config.write_text(contract.python_model_config(
        "tensorrt_llm", contract.TENSORRT_LLM_INPUTS, contract.TENSORRT_LLM_OUTPUTS, 64, True,
        {"engine_dir": str(tiny_chat_engine()), "device": "cpu"}))
    model = trtllm.TensorRTLLMModel()
    model.initialize({"model_config": _model_config_json(config),
                      "model_repository": str(tmp_path), "model_name": "tensorrt_llm"})
    return model


@pytest.mark.parametrize("name, words, message", [
    ("stop_words_list", [[-3, 5], [2, -1]], "stop_words_list: token id -3 is not in the "
     "vocabulary (0 to 49151)"),
    ("bad_words_list", [[5, -7], [2, -1]], "bad_words_list: token id -7 is not in the "
     "vocabulary (0 to 49151)"),
    ("bad_words_list", [[1_000_000, 5], [2, -1]], "bad_words_list: token id 1000000 is not "
     "in the vocabulary (0 to 49151)"),
])
def test_word_list_ids_outside_the_vocabulary(trtllm, name, words, message):
    """A multi-token word with a negative id made the tokenizer raise OverflowError out of
    execute (Triton then fails the request with a traceback, not an answer); an id past
    the vocabulary was silently dropped from the word."""
    from kiln.tokenizer import Tokenizer
    from tests.test_serve_triton_repo import FakeRequest

    model = object.__new__(trtllm.TensorRTLLMModel)  # refused before the engine is used
    model.tokenizer = Tokenizer.from_engine(tiny_chat_engine())
    model.vocab_size = 49152
    request = FakeRequest(input_ids=np.array([[1, 2, 3]], np.int32),
                          request_output_len=np.array([[4]], np.int32),
                          **{name: np.array([words], np.int32)})
    model.execute([request])
    [(response, flags)] = request.sender.responses
    assert flags == 1 and response.error is not None
    assert response.error.message() == message


class _Family:
    GAUGE = 1

    def __init__(self, **_: object) -> None:
        pass

    def Metric(self, labels: dict) -> object:  # noqa: N802 (Triton's name)
        return type("Gauge", (), {"set": lambda self, value: None})()


@pytest.fixture
def trtllm_model(trtllm, tmp_path):
    """An initialized tensorrt_llm model over the tiny engine, as Triton loads it."""
    sys.modules["triton_python_backend_utils"].MetricFamily = _Family
    model = _initialized(trtllm, tmp_path)
    yield model
    model.finalize()


def test_a_response_that_cannot_be_sent_ends_the_request(trtllm_model):
    """Triton refusing a response (its sender closed) used to be logged and the request
    generated on to request_output_len, every token another failed send, its KV blocks
    held; now the request is aborted at the first failure."""
    from tests.test_serve_support import wait_until
    from tests.test_serve_triton_repo import FakeRequest, FakeSender

    class ClosedSender(FakeSender):
        attempts = 0

        def send(self, response=None, flags: int = 0) -> None:
            self.attempts += 1
            raise RuntimeError("Unable to send the response: the sender is closed")

    request = FakeRequest(input_ids=np.array([[1, 2, 3]], np.int32),
                          request_output_len=np.array([[120]], np.int32),
                          end_id=np.array([[0]], np.int32),
                          temperature=np.array([[0.0]], np.float32),
                          streaming=np.array([[True]]))
    request.sender = ClosedSender()
    trtllm_model.execute([request])
    assert wait_until(lambda: request.sender.attempts > 0)
    stats = trtllm_model.loop.stats
    assert wait_until(lambda: stats()["num_running"] == 0 and stats()["kv_blocks_used"] == 0)
    assert request.sender.attempts <= 2


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN"])
def test_an_infinite_max_tokens_is_400(server, value):
    """Python's json reads Infinity and NaN; int(inf) raised OverflowError: a 500."""
    body = '{"text_input": "Hi", "max_tokens": ' + value + '}'
    reply = httpx.post(f"{server.url}/v2/models/{MODEL}/generate", content=body,
                       headers={"content-type": "application/json"}, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == f"max_tokens must be an integer, got {float(value)!r}"
    assert httpx.post(f"{server.url}/v2/models/{MODEL}/generate", timeout=60, json={
        "text_input": "Hi", "max_tokens": 2}).status_code == 200


def test_an_end_id_among_the_engines_eos_ids_keeps_them_all(trtllm_model):
    """The ensemble's preprocessing sends the tokenizer's EOS as end_id: that used to turn
    the engine's other EOS ids off (ignore_eos), so a model with several ran on past them.
    Another end_id still replaces EOS, as in TensorRT-LLM."""
    from tests.test_serve_triton_repo import FakeRequest

    eos = sorted(trtllm_model.eos_ids)
    assert eos
    base = {"input_ids": np.array([[1, 2, 3]], np.int32),
            "request_output_len": np.array([[4]], np.int32)}
    _, params, *_ = trtllm_model._parse(FakeRequest(**base, end_id=np.array([[eos[0]]])))
    assert not params.ignore_eos and params.stop_token_ids == []
    other = next(t for t in range(5, 100) if t not in eos)
    _, params, *_ = trtllm_model._parse(FakeRequest(**base, end_id=np.array([[other]])))
    assert params.ignore_eos and params.stop_token_ids == [other]


def test_tokens_are_sent_off_the_engine_thread(trtllm_model):
    """The engine thread used to call is_cancelled() and send() for every token of every
    request (a round trip to Triton each): the outbox's thread sends them now, as the kiln
    model's do."""
    import threading

    from tests.test_serve_support import wait_until
    from tests.test_serve_triton_repo import FakeRequest, FakeSender

    class Sender(FakeSender):
        threads: set[str] = set()

        def send(self, response=None, flags: int = 0) -> None:
            self.threads.add(threading.current_thread().name)
            super().send(response, flags)

    request = FakeRequest(input_ids=np.array([[1, 2, 3]], np.int32),
                          request_output_len=np.array([[12]], np.int32),
                          temperature=np.array([[0.0]], np.float32),
                          streaming=np.array([[True]]))
    request.sender = Sender()
    trtllm_model.execute([request])
    assert wait_until(lambda: request.sender.finished.is_set())
    assert request.sender.threads == {"kiln-triton-send"}
    tokens = [t for r, _ in request.sender.responses if r is not None
              for t in r.outputs["output_ids"].reshape(-1).tolist()]
    assert len(tokens) == 12


def test_the_model_loads_on_a_triton_without_metrics(trtllm, tmp_path):
    assert not hasattr(sys.modules["triton_python_backend_utils"], "MetricFamily")
    _initialized(trtllm, tmp_path).finalize()
