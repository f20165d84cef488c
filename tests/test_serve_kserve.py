"""KServe v2 / Triton endpoints: tritonclient for health and metadata, plain HTTP for
Triton's generate extension (tritonclient has no generate call)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.test_serve_support import MODEL

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.conftest import SERVE_PROMPT as PROMPT  # noqa: E402


def test_tritonclient_health_and_metadata(server):
    client = tritonclient_http.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
        assert not client.is_model_ready("other")
        assert "generate" in client.get_server_metadata()["extensions"]
        meta = client.get_model_metadata(MODEL)
        assert meta["name"] == MODEL and meta["versions"] == ["1"]
        assert {"name": "text_input", "datatype": "BYTES", "shape": [1]} in meta["inputs"]
        assert [o["name"] for o in meta["outputs"]] == ["text_output"]
        with pytest.raises(InferenceServerException, match="does not exist"):
            client.get_model_metadata("other")
    finally:
        client.close()


def test_generate(server, greedy_text):
    url = f"{server.url}/v2/models/{MODEL}/generate"
    nested = httpx.post(url, json={"text_input": PROMPT,
                                   "parameters": {"max_tokens": 8, "temperature": 0}}).json()
    assert nested["text_output"] == PROMPT + greedy_text  # the prompt first, as Triton's LLMs
    assert nested["model_name"] == MODEL and nested["model_version"] == "1"
    flat = httpx.post(f"{server.url}/v2/models/{MODEL}/versions/1/generate",
                      json={"text_input": [PROMPT], "max_tokens": [8], "temperature": 0.0,
                            "exclude_input_in_output": True}).json()
    assert flat["text_output"] == greedy_text


def _events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_generate_stream(server, greedy_text):
    with httpx.stream("POST", f"{server.url}/v2/models/{MODEL}/generate_stream",
                      json={"text_input": PROMPT, "max_tokens": 8, "temperature": 0,
                            "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
    assert "".join(e["text_output"] for e in events) == greedy_text
    assert events[-1]["finish_reason"] == "length"
    stop = greedy_text[3:6]
    with httpx.stream("POST", f"{server.url}/v2/models/{MODEL}/generate_stream",
                      json={"text_input": PROMPT, "max_tokens": 8, "temperature": 0,
                            "stop_words": [stop]}) as response:
        events = _events(response)
    assert "".join(e["text_output"] for e in events) == greedy_text[:greedy_text.index(stop)]


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"parameters": {"max_tokens": 4}}, 400, "text_input is required"),
    ({"text_input": 5}, 400, "text_input must be a string"),
    ({"text_input": "hi", "beam_width": 4}, 400, "unknown input 'beam_width'"),
    ({"text_input": "hi", "max_tokens": "four"}, 400, "max_tokens must be an integer"),
    ({"text_input": "hi", "temperature": -1}, 400, "temperature"),
    ({"text_input": "hi", "max_tokens": 100_000}, 400, "max_seq_len"),
    ({"text_input": "hi", "parameters": [1]}, 400, "parameters must be an object"),
])
def test_generate_errors(server, body, status, words):
    for route in ("generate", "generate_stream"):
        response = httpx.post(f"{server.url}/v2/models/{MODEL}/{route}", json=body)
        assert response.status_code == status
        assert words in response.json()["error"]


def test_generate_as_docs_curl_it(server, greedy_text):
    """docs/serving.md's `curl -d` (form content type, as curl sends by default) works as
    JSON; `stream` on generate is a 400 pointing to generate_stream."""
    body = {"text_input": PROMPT, "max_tokens": 8, "temperature": 0}
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/generate",
                          content=json.dumps(body).encode(),
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text
    assert response.json()["text_output"] == PROMPT + greedy_text
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/generate",
                          json={**body, "stream": True})
    assert response.status_code == 400 and "generate_stream" in response.json()["error"]


def test_unknown_model_and_bad_json(server):
    response = httpx.post(f"{server.url}/v2/models/other/generate", json={"text_input": "x"})
    assert response.status_code == 404 and "other" in response.json()["error"]
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/versions/7/generate",
                          json={"text_input": "x"})
    assert response.status_code == 404
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/generate", content=b"{oops",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]


def test_generate_uint64_seed_is_the_int64_of_its_bits(server):
    """Triton's seed input is UINT64: 2**64 - 1 samples as the int64 -1 does (it was
    refused once SamplingParams took int64 seeds only)."""
    url = f"{server.url}/v2/models/{MODEL}/generate"

    def text(seed: int) -> str:
        reply = httpx.post(url, json={"text_input": PROMPT, "exclude_input_in_output": True,
                                      "parameters": {"max_tokens": 8, "temperature": 1.0,
                                                     "seed": seed}})
        assert reply.status_code == 200, reply.text
        return reply.json()["text_output"]

    assert text(2**64 - 1) == text(-1)
    assert httpx.post(url, json={"text_input": PROMPT, "parameters": {
        "max_tokens": 2, "seed": 2**64}}).status_code == 400
