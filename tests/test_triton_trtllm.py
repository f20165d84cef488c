"""TensorRT-LLM's tensor contract on a real tritonserver (`kiln triton-repo
--tensorrt-llm`, SmolLM2): requests shaped as TensorRT-LLM's own clients send them, to
the token-level `tensorrt_llm` model over gRPC streaming and to the `ensemble` over
Triton's HTTP generate endpoint, give the engine's own greedy tokens and logprobs."""

from __future__ import annotations

import math
import queue

import httpx
import numpy as np
import pytest

from kiln import LLM, SamplingParams
from kiln.serve import trtllm_contract as contract
from kiln.tokenizer import Tokenizer

PROMPT = "The capital of France is"
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def reference(smollm2_engine):
    return LLM(smollm2_engine, device="cpu")


@pytest.fixture(scope="module")
def tokenizer(smollm2_engine):
    return Tokenizer.from_engine(smollm2_engine)


@pytest.fixture(scope="module")
def greedy(reference):
    return reference.generate(PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                     logprobs=0))[0]


def _tensor(name: str, array: np.ndarray):
    import tritonclient.grpc as grpc
    from tritonclient.utils import np_to_triton_dtype

    tensor = grpc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def _trtllm_inputs(ids: list[int], max_tokens: int, **extra: np.ndarray) -> list:
    """What TensorRT-LLM's inflight_batcher_llm_client sends: batch dim 1 everywhere."""
    tensors = {"input_ids": np.array([ids], np.int32),
               "input_lengths": np.array([[len(ids)]], np.int32),
               "request_output_len": np.array([[max_tokens]], np.int32),
               "beam_width": np.array([[1]], np.int32),
               "runtime_top_k": np.array([[1]], np.int32),  # greedy, as that client does
               "end_id": np.array([[2]], np.int32), "pad_id": np.array([[2]], np.int32),
               **extra}
    return [_tensor(name, array) for name, array in tensors.items()]


def _stream(server, model: str, inputs: list) -> list:
    """Send one request on a gRPC stream; its responses (InferResult) until the final."""
    import tritonclient.grpc as grpc

    results: queue.Queue = queue.Queue()
    client = grpc.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        out = []
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                raise error
            response = result.get_response()
            if response.outputs:
                out.append(result)
            if response.parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()
        client.close()


def test_model_configs_match_the_contract(tritonserver):
    import tritonclient.http as http

    client = http.InferenceServerClient(tritonserver.http.removeprefix("http://"))
    for name, inputs, outputs in (
            ("tensorrt_llm", contract.TENSORRT_LLM_INPUTS, contract.TENSORRT_LLM_OUTPUTS),
            ("preprocessing", contract.PREPROCESSING_INPUTS, contract.PREPROCESSING_OUTPUTS),
            ("postprocessing", contract.POSTPROCESSING_INPUTS, contract.POSTPROCESSING_OUTPUTS),
            ("ensemble", [s for s, _, _ in contract.ENSEMBLE_INPUTS], contract.ENSEMBLE_OUTPUTS)):
        assert client.is_model_ready(name)
        metadata = client.get_model_metadata(name)
        # Triton reports the batch dim as -1 in front of the configured dims.
        want = {s.name: (s.data_type.removeprefix("TYPE_").replace("STRING", "BYTES"),
                         [-1, *s.dims]) for s in inputs}
        assert {t["name"]: (t["datatype"], t["shape"]) for t in metadata["inputs"]} == want
        assert {t["name"] for t in metadata["outputs"]} == {s.name for s in outputs}
    # the names TensorRT-LLM clients rely on, spelled out independently of kiln's tables
    names = {t["name"] for t in client.get_model_metadata("tensorrt_llm")["inputs"]}
    assert {"input_ids", "input_lengths", "request_output_len", "end_id", "pad_id",
            "beam_width", "temperature", "runtime_top_k", "runtime_top_p", "random_seed",
            "streaming", "stop_words_list", "bad_words_list", "return_log_probs"} <= names
    config = client.get_model_config("tensorrt_llm")
    assert config["model_transaction_policy"]["decoupled"] is True


def test_tensorrt_llm_tokens_and_logprobs(tritonserver, greedy):
    ids = greedy.prompt_token_ids
    [result] = _stream(tritonserver, "tensorrt_llm", _trtllm_inputs(
        ids, MAX_TOKENS, return_log_probs=np.array([[True]])))
    output_ids, lengths = result.as_numpy("output_ids"), result.as_numpy("sequence_length")
    assert output_ids.dtype == np.int32 and output_ids.shape[:2] == (1, 1)
    assert lengths.tolist() == [[len(ids) + len(greedy.token_ids)]]
    assert output_ids[0, 0, :lengths[0, 0]].tolist() == ids + greedy.token_ids
    want = [d[t] for d, t in zip(greedy.outputs[0].logprobs, greedy.token_ids)]
    got = result.as_numpy("output_log_probs")[0, 0, len(ids):lengths[0, 0]]
    assert np.allclose(got, want, atol=1e-3)
    assert math.isclose(result.as_numpy("cum_log_probs")[0, 0], sum(want), abs_tol=1e-2)


def test_tensorrt_llm_streaming_sends_new_tokens(tritonserver, greedy):
    results = _stream(tritonserver, "tensorrt_llm", _trtllm_inputs(
        greedy.prompt_token_ids, MAX_TOKENS, streaming=np.array([[True]])))
    tokens = [t for r in results
              for t in r.as_numpy("output_ids")[0, 0, :r.as_numpy("sequence_length")[0, 0]]]
    assert len(results) > 1 and tokens == greedy.token_ids


def test_tensorrt_llm_stop_words_list(tritonserver, reference, greedy, tokenizer):
    stop = greedy.token_ids[3]
    want = reference.generate(PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                     stop_token_ids=[stop]))[0].token_ids
    stop_words = np.array([[[stop], [1]]], np.int32)  # [1, 2, n]: ids, then end offsets
    [result] = _stream(tritonserver, "tensorrt_llm", _trtllm_inputs(
        greedy.prompt_token_ids, MAX_TOKENS, stop_words_list=stop_words,
        exclude_input_in_output=np.array([[True]])))
    n = result.as_numpy("sequence_length")[0, 0]
    assert result.as_numpy("output_ids")[0, 0, :n].tolist() == want
    assert len(want) < MAX_TOKENS


def test_tensorrt_llm_refuses_what_it_does_not_serve(tritonserver, greedy):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="beam_width"):
        _stream(tritonserver, "tensorrt_llm", _trtllm_inputs(
            greedy.prompt_token_ids, 4, beam_width=np.array([[2]], np.int32)))
    with pytest.raises(InferenceServerException, match="the prompt is empty"):
        _stream(tritonserver, "tensorrt_llm", _trtllm_inputs(
            greedy.prompt_token_ids, 4, input_lengths=np.array([[0]], np.int32)))
    with pytest.raises(InferenceServerException, match="lora_task_id"):
        _stream(tritonserver, "tensorrt_llm", _trtllm_inputs(
            greedy.prompt_token_ids, 4, lora_task_id=np.array([[1]], np.uint64)))


def test_ensemble_generate_as_in_tensorrt_llm_docs(tritonserver, greedy, tokenizer):
    # The request of TensorRT-LLM's quick start, greedy.
    r = httpx.post(f"{tritonserver.http}/v2/models/ensemble/generate", timeout=120, json={
        "text_input": PROMPT, "max_tokens": MAX_TOKENS, "bad_words": "", "stop_words": "",
        "top_k": 1})
    assert r.status_code == 200, r.text
    want = tokenizer.decode(greedy.prompt_token_ids + greedy.token_ids)
    assert r.json()["text_output"] == want


def test_ensemble_streams_over_grpc(tritonserver, greedy):
    def text(value: str) -> np.ndarray:
        return np.array([[value.encode()]], dtype=np.object_)

    results = _stream(tritonserver, "ensemble", [
        _tensor("text_input", text(PROMPT)),
        _tensor("max_tokens", np.array([[MAX_TOKENS]], np.int32)),
        _tensor("temperature", np.array([[0.0]], np.float32)),
        _tensor("stream", np.array([[True]]))])
    pieces = [r.as_numpy("text_output")[0][0].decode() for r in results]
    assert len(pieces) > 1 and "".join(pieces) == greedy.text
