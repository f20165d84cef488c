"""KServe v2 `infer` with tensors: tritonclient.http's `infer` (binary and JSON tensor
data) and raw httpx, against a kiln server; bad tensors are 400s with a message."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.test_serve_support import MODEL

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.conftest import SERVE_PROMPT as PROMPT  # noqa: E402


def _str(element: bytes | str) -> str:
    # tritonclient gives bytes for binary BYTES data and str for JSON data, as with Triton
    return element.decode() if isinstance(element, bytes) else element


def _inputs(binary: bool, **extra: np.ndarray) -> list:
    tensors = {"text_input": np.array([PROMPT.encode()], dtype=np.object_),
               "max_tokens": np.array([8], dtype=np.int32),
               "temperature": np.array([0.0], dtype=np.float32), **extra}
    types = {np.dtype(np.object_): "BYTES", np.dtype(np.int32): "INT32",
             np.dtype(np.float32): "FP32", np.dtype(np.bool_): "BOOL",
             np.dtype(np.uint64): "UINT64"}
    out = []
    for name, array in tensors.items():
        tensor = tritonclient_http.InferInput(name, list(array.shape), types[array.dtype])
        tensor.set_data_from_numpy(array, binary_data=binary)
        out.append(tensor)
    return out


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [None, True, False])
def test_tritonclient_infer(server, greedy_text, binary_in, binary_out):
    client = tritonclient_http.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        outputs = (None if binary_out is None else
                   [tritonclient_http.InferRequestedOutput("text_output",
                                                           binary_data=binary_out)])
        result = client.infer(MODEL, _inputs(binary_in), outputs=outputs, request_id="r1")
        text = result.as_numpy("text_output")
        assert text.shape == (1,)
        assert _str(text[0]) == PROMPT + greedy_text  # the prompt first, as generate
        response = result.get_response()
        assert response["id"] == "r1" and response["model_name"] == MODEL
        assert response["parameters"]["finish_reason"] == "length"
        excluded = client.infer(MODEL, _inputs(binary_in, exclude_input_in_output=np.array(
            [True]), seed=np.array([3], dtype=np.uint64)), model_version="1")
        assert _str(excluded.as_numpy("text_output")[0]) == greedy_text
    finally:
        client.close()


def test_tritonclient_infer_error(server):
    client = tritonclient_http.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        bad = tritonclient_http.InferInput("temperature", [1], "BYTES")
        bad.set_data_from_numpy(np.array([b"hot"], dtype=np.object_))
        with pytest.raises(InferenceServerException, match="must be FP32"):
            client.infer(MODEL, [*_inputs(True)[:2], bad])
    finally:
        client.close()


def test_raw_json_infer(server, greedy_text):
    reply = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json={
        "inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [PROMPT]},
            {"name": "max_tokens", "datatype": "INT32", "shape": [1], "data": [8]},
            {"name": "temperature", "datatype": "FP32", "shape": [1], "data": [0]},
            {"name": "exclude_input_in_output", "datatype": "BOOL", "shape": [1],
             "data": [True]}]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [1],
                                "data": [greedy_text]}]
    assert body["model_version"] == "1" and "id" not in body


def test_metadata_lists_infer_tensors(server):
    meta = httpx.get(f"{server.url}/v2/models/{MODEL}").json()
    inputs = {t["name"]: t for t in meta["inputs"]}
    assert inputs["text_input"] == {"name": "text_input", "datatype": "BYTES", "shape": [1]}
    assert inputs["max_tokens"]["datatype"] == "INT32"
    assert inputs["temperature"]["datatype"] == "FP32"
    assert meta["outputs"][0]["name"] == "text_output"
    assert "binary_tensor_data" in httpx.get(f"{server.url}/v2").json()["extensions"]


TEXT = {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["Hi"]}


@pytest.mark.parametrize("body, words", [
    ({}, "inputs must be a non-empty list"),
    ({"inputs": [{"name": "max_tokens", "datatype": "INT32", "shape": [1], "data": [2]}]},
     "text_input is required"),
    ({"inputs": [TEXT, {"name": "colour", "datatype": "BYTES", "shape": [1],
                        "data": ["red"]}]}, "unknown input 'colour'"),
    ({"inputs": [TEXT, {"name": "max_tokens", "datatype": "FP32", "shape": [1],
                        "data": [2.0]}]}, "must be INT32"),
    ({"inputs": [TEXT, {"name": "max_tokens", "datatype": "INT32", "shape": [2],
                        "data": [2]}]}, "holds 2 elements, the data has 1"),
    ({"inputs": [TEXT, {"name": "max_tokens", "datatype": "INT32", "shape": [1],
                        "data": ["two"]}]}, "is not a INT32 element"),
    ({"inputs": [{**TEXT, "shape": [2], "data": ["a", "b"]}]},
     "text_input must be a single value"),
    ({"inputs": [TEXT, {"name": "max_tokens", "datatype": "INT32", "shape": [1]}]},
     "has no data"),
    ({"inputs": [TEXT, {"name": "temperature", "datatype": "FP32", "shape": [1],
                        "data": [-1]}]}, "temperature must be >= 0"),
    ({"inputs": [TEXT], "outputs": [{"name": "logits"}]}, "unknown output 'logits';"),
    ({"inputs": [TEXT, {"name": "stream", "datatype": "BOOL", "shape": [1],
                        "data": [True]}]}, "use generate_stream"),
    ({"inputs": [{**TEXT, "parameters": {"binary_data_size": 10}}]}, "past the end"),
])
def test_bad_tensors_are_400(server, body, words):
    reply = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body)
    assert reply.status_code == 400, reply.text
    assert words in reply.json()["error"]


def test_bad_json_and_unknown_model(server):
    url = f"{server.url}/v2/models/{MODEL}/infer"
    reply = httpx.post(url, content=b"{nope", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]
    reply = httpx.post(url, content=b"{}", headers={"inference-header-content-length": "99"})
    assert reply.status_code == 400 and "Inference-Header" in reply.json()["error"]
    missing = httpx.post(f"{server.url}/v2/models/other/infer", json={"inputs": [TEXT]})
    assert missing.status_code == 404 and "does not exist" in missing.json()["error"]
