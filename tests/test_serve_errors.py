"""Bad input, limits and failures: each gets its status code and a message in the API's
error schema, never a traceback, and the server answers the next good request."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import openai
import pytest

from tests.test_serve_support import MODEL, metric, serve, wait_until

GOOD = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    with serve(max_body_bytes=20_000) as served:
        yield served


def _check_error(response: httpx.Response, status: int, *words: str,
                 param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(("body", "words", "param"), [
    ({"temperature": -1}, ["temperature"], "temperature"),
    ({"top_p": 1.5}, ["top_p"], "top_p"),
    ({"presence_penalty": 3}, ["presence_penalty"], "presence_penalty"),
    ({"max_tokens": -1}, ["max_tokens"], "max_tokens"),
    ({"max_tokens": 0, "stream": True}, ["max_tokens 0", "stream"], "max_tokens"),
    ({"n": -1}, ["n must"], "n"),
    ({"min_tokens": 10, "max_tokens": 2}, ["min_tokens", "max_tokens"], "min_tokens"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "bogus"}}}}, ["response_format", "bogus"], "response_format"),
    ({"max_tokens": 10_000}, ["max_seq_len"], "prompt"),
    ({"prompt": "word " * 400}, ["max_seq_len"], "prompt"),
    ({"prompt": ""}, ["empty"], None),
    ({"prompt": [10**6]}, ["token ids"], None),
    ({"prompt": None}, ["prompt"], "prompt"),
    ({"max_tokens": "many"}, ["max_tokens"], "max_tokens"),
    ({"n": 0}, ["n must"], "n"),
    ({"logprobs": 50}, ["logprobs"], "logprobs"),
    ({"seed": 2**64}, ["seed"], "seed"),
    ({"suffix": "end"}, ["suffix"], "suffix"),
    ({"best_of": 2, "n": 3}, ["best_of", "at least n"], "best_of"),
    ({"prompt": ["Hi"] * 129}, ["at most 128 prompts", "129"], "prompt"),
    ({"prompt": [[1, 2]] * 200, "n": 2}, ["at most 128 prompts", "200"], "prompt"),
    ({"prompt": ["Hi"] * 65, "n": 2}, ["n must be in [1, 1]"], "n"),
    ({"stream_options": {"include_usage": True}}, ["stream_options", "stream: true"],
     "stream_options"),
])
def test_bad_completion_requests(server, body, words, param):
    response = httpx.post(server.v1 + "/completions", json={**GOOD, **body})
    _check_error(response, 400, *words, param=param)


def test_missing_and_malformed(server):
    _check_error(httpx.post(server.v1 + "/completions", json={"model": MODEL}), 400,
                 "prompt", "required", param="prompt")
    _check_error(httpx.post(server.v1 + "/chat/completions", json={"model": MODEL}), 400,
                 "messages", param="messages")
    _check_error(httpx.post(server.v1 + "/completions", content=b'{"prompt": "x",',
                            headers={"content-type": "application/json"}), 400, "JSON")
    _check_error(httpx.get(server.url + "/v1/nowhere"), 404, "no route")


@pytest.mark.parametrize(("body", "words", "param"), [
    ({"messages": []}, ["messages"], "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, ["role"], "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     ["text"], "messages"),
    ({"top_logprobs": 2}, ["logprobs"], "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "any"},
     ["tool_choice"], "tool_choice"),
    ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, ["function"], "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": "f"}},
     ["tool_choice", "{'name': ...}"], "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function"}}, ["tool_choice", "{'name': ...}"], "tool_choice"),
    ({"response_format": {"type": "yaml"}}, ["response_format"], "response_format"),
    ({"max_completion_tokens": 10_000}, ["max_seq_len"], "messages"),
    ({"max_completion_tokens": 0}, ["max_completion_tokens"], "max_completion_tokens"),
    ({"logprobs": True, "top_logprobs": 21}, ["top_logprobs"], "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "bogus"}}}], "tool_choice": "required"}, ["tools", "bogus"], "tools"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function"}]}]},
     ["tool_calls"], "messages"),
    ({"stream_options": {"include_usage": True}, "stream": False},
     ["stream_options", "stream: true"], "stream_options"),
])
def test_bad_chat_requests(server, body, words, param):
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = httpx.post(server.v1 + "/chat/completions", json={**good, **body})
    error = _check_error(response, 400, *words, param=param)
    assert ".cc:" not in error["message"]  # no grammar library internals


def _http_count(server, route: str, status: int) -> float:
    text = httpx.get(server.url + "/metrics").text
    return metric(text, f'kiln_http_requests_total{{route="{route}",status="{status}"}}', 0.0)


@pytest.mark.parametrize(("route", "raw", "where", "param"), [
    ("/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}',
     "messages[0].content", "messages"),
    ("/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", '
     '"text": "hi \\ud800"}]}]}', "messages[0].content[0].text", "messages"),
    ("/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "tools": [{'
     '"type": "function", "function": {"name": "f", "description": "\\ud800"}}]}',
     "tools[0].function.description", "tools"),
    ("/completions", '{"prompt": "\\ud800 hi"}', "prompt", "prompt"),
    ("/completions", '{"prompt": ["ok", "\\udbff\\udbff"]}', "prompt[1]", "prompt"),
    ("/completions", '{"prompt": "hi", "stop": ["\\udfff"]}', "stop[0]", "stop"),
])
def test_text_that_is_not_unicode(server, route, raw, where, param):
    """A JSON escape can carry a lone surrogate, which is not Unicode (no UTF-8, no
    tokenizer takes it): a 400 naming the field, and the server goes on."""
    body = json.loads(raw) | {"model": MODEL, "max_tokens": 2}
    response = httpx.post(server.v1 + route, content=json.dumps(body),
                          headers={"content-type": "application/json"})
    error = _check_error(response, 400, f"{where} is not valid Unicode", "lone surrogate",
                         param=param)
    assert "U+D" in error["message"]
    assert httpx.post(server.v1 + "/completions", json=GOOD).status_code == 200


def test_text_that_is_not_unicode_v2_and_tokenizer(server):
    for raw, name in (('{"text_input": "\\ud800 hi"}', "text_input"),
                      ('{"text_input": "hi", "stop": ["\\udfff"]}', "stop")):
        response = httpx.post(server.url + f"/v2/models/{MODEL}/generate", content=raw)
        assert response.status_code == 400, response.text
        assert response.json()["error"].startswith(f"{name} is not valid Unicode")
    from kiln.errors import RequestError

    with pytest.raises(RequestError, match="not valid Unicode.*U\\+DFFF at character 3"):
        server.llm.tokenizer.encode("abc\udfff")  # kiln run, LLM.generate: the same 400


def test_json_body_without_its_content_type(server):
    """`curl -d` sends a form content type: the OpenAI routes read the body as JSON, and
    /metrics counts it under its route."""
    before = _http_count(server, "/v1/completions", 200)
    unmatched = _http_count(server, "unmatched", 200)
    response = httpx.post(server.v1 + "/completions", content=json.dumps(GOOD).encode(),
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text
    assert _http_count(server, "/v1/completions", 200) == before + 1
    assert _http_count(server, "unmatched", 200) == unmatched
    assert response.json()["choices"][0]["text"] == httpx.post(
        server.v1 + "/completions", json=GOOD).json()["choices"][0]["text"]
    generate = f"/v2/models/{MODEL}/generate"
    before = _http_count(server, "/v2/models/{name}/generate", 200)
    assert httpx.post(server.url + generate, content=b'{"text_input": "hi", "max_tokens": 2}'
                      ).status_code == 200
    assert _http_count(server, "/v2/models/{name}/generate", 200) == before + 1


def test_openai_client_sees_bad_request_and_server_goes_on(server):
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="Hi", temperature=-0.5)
    with pytest.raises(openai.BadRequestError, match="max_seq_len"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5000, stream=True)
    assert client.completions.create(**GOOD).choices[0].finish_reason in ("stop", "length")


def test_body_size_limit(server):
    big = {**GOOD, "prompt": "x" * 30_000}
    before = _http_count(server, "/v1/completions", 413)
    _check_error(httpx.post(server.v1 + "/completions", json=big), 413, "exceeds")
    assert _http_count(server, "/v1/completions", 413) == before + 1  # its route, refused

    def chunked():  # no content-length: counted as it arrives
        yield json.dumps(big).encode()

    response = httpx.post(server.v1 + "/completions", content=chunked(),
                          headers={"content-type": "application/json"})
    assert _check_error(response, 413, "exceeds")["code"] == "request_too_large"
    assert _http_count(server, "/v1/completions", 413) == before + 2
    assert httpx.post(server.v1 + "/completions", json=GOOD).status_code == 200


def test_engine_failure_is_a_500_without_traceback(server):
    engine = server.llm.engine
    real_step = engine.step

    def broken_step():
        engine.step = real_step
        raise RuntimeError("simulated device fault")

    engine.step = broken_step
    response = httpx.post(server.v1 + "/completions", json=GOOD)
    error = _check_error(response, 500, "engine failed")
    assert error["type"] == "server_error"
    assert wait_until(lambda: server.llm.stats()["kv_blocks_used"] == 0)
    assert httpx.post(server.v1 + "/completions", json=GOOD).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_bug_is_a_plain_500(server, monkeypatch):
    async def buggy_submit(requests):
        raise ValueError("secret internals")

    monkeypatch.setattr(server.llm, "submit", buggy_submit)
    for route, body in (("/v1/completions", GOOD),
                        (f"/v2/models/{MODEL}/generate", {"text_input": "hi"})):
        response = httpx.post(server.url + route, json=body)
        assert response.status_code == 500
        assert "secret" not in response.text and "Traceback" not in response.text
        assert "internal server error" in response.text
    monkeypatch.undo()
    assert httpx.post(server.v1 + "/completions", json=GOOD).status_code == 200


@pytest.mark.parametrize("route", ["/v1/completions", f"/v2/models/{MODEL}/generate"])
def test_client_that_hangs_up_aborts_a_whole_answer(server, route):
    def aborted() -> float:
        text = httpx.get(server.url + "/metrics").text
        return metric(text, 'kiln_requests_finished_total{finish_reason="abort"}', 0.0)

    before = aborted()
    body = {"text_input": "Tell me everything"} if route.startswith("/v2") else {
        "model": MODEL, "prompt": "Tell me everything"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + route, json={**body, "max_tokens": 240, "ignore_eos": True},
                   timeout=0.3)
    assert wait_until(lambda: server.llm.num_unfinished == 0
                      and server.llm.stats()["kv_blocks_used"] == 0)
    assert aborted() == before + 1


@pytest.mark.parametrize("route", ["/v1/completions", f"/v2/models/{MODEL}/generate"])
def test_client_that_leaves_before_acceptance_is_never_run(server, route, monkeypatch):
    """A client that leaves while its request waits for the engine (busy with a long step)
    has its request aborted before the engine runs it: no step ever produces an output
    for it (QA: such requests were prefilled anyway, holding up everyone after them)."""
    engine, slow, seen = server.llm.engine, threading.Event(), set()
    real_step = engine.step

    def step():
        if slow.is_set():
            slow.clear()
            time.sleep(1.0)  # a long prompt step
        outputs = real_step()
        seen.update(o.request_id for o in outputs)
        return outputs

    monkeypatch.setattr(engine, "step", step)
    body = {"text_input": "Tell me everything"} if route.startswith("/v2") else {
        "model": MODEL, "prompt": "Tell me everything"}
    busy = threading.Thread(target=httpx.post, args=(server.url + route,), kwargs=dict(
        json={**body, "max_tokens": 120, "ignore_eos": True}, timeout=60))
    busy.start()
    assert wait_until(lambda: seen)
    running = set(seen)
    slow.set()
    assert wait_until(lambda: not slow.is_set())  # the engine is in its long step
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + route, json={**body, "max_tokens": 5}, timeout=0.3)
    busy.join()
    assert wait_until(lambda: server.llm.num_unfinished == 0)
    assert seen == running, seen - running


def test_metrics_and_request_log(server, caplog):
    with caplog.at_level(logging.INFO, logger="kiln.serve.requests"):
        assert httpx.post(server.v1 + "/completions", json=GOOD).status_code == 200
        assert httpx.post(server.v1 + "/completions", json={**GOOD, "top_p": 2}).status_code \
            == 400
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "kiln.serve.requests"]
    ok, bad = lines[-2:]
    assert ok["status"] == "ok" and ok["route"] == "/v1/completions"
    assert ok["completion_tokens"] == 3 and ok["ttft_ms"] > 0 and ok["latency_ms"] >= \
        ok["ttft_ms"]
    assert bad["status"] == "error" and "top_p" in bad["error"]
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, 'kiln_http_requests_total{route="/v1/completions",status="200"}') >= 1
    assert metric(text, 'kiln_http_requests_total{route="/v1/completions",status="400"}') >= 1
    assert metric(text, "kiln_time_to_first_token_seconds_count") >= 1
    assert metric(text, "kiln_time_per_output_token_seconds_count") >= 1
    assert metric(text, "kiln_e2e_request_latency_seconds_count") >= 1
    assert metric(text, "kiln_generation_tokens_total") >= 3
    for gauge in ("kiln_num_requests_running", "kiln_num_requests_waiting",
                  "kiln_kv_cache_usage_ratio", "kiln_prefix_cache_hit_rate"):
        assert metric(text, gauge) >= 0
    assert metric(text, "kiln_kernel_compiles_after_load_total") == 0  # the CPU compiles none


def test_api_key():
    with serve(api_key="s3cret") as server:
        for path in ("/health", "/v2/health/live", "/v2/health/ready",
                     f"/v2/models/{MODEL}/ready"):
            assert httpx.get(server.url + path).status_code == 200, path
        for path in ("/v1/models", "/metrics", f"/v2/models/{MODEL}"):
            response = httpx.get(server.url + path)
            assert response.status_code == 401, path
        _check_error(httpx.post(server.v1 + "/completions", json=GOOD,
                                headers={"Authorization": "Bearer wrong"}), 401, "API key")
        text = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer s3cret"}).text
        assert metric(text, 'kiln_http_requests_total{route="/v1/completions",status="401"}') \
            == 1  # refused before routing, counted under its route
        assert httpx.post(server.url + f"/v2/models/{MODEL}/generate",
                          json={"text_input": "hi"}).json() == {
            "error": "a valid API key is required: send 'Authorization: Bearer <key>'"}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.v1, api_key="nope", max_retries=0).models.list()
        client = openai.OpenAI(base_url=server.v1, api_key="s3cret", max_retries=0)
        assert client.completions.create(**GOOD).choices


def test_full_queue_answers_429_at_once():
    with serve(max_queue=2) as server:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        long = dict(model=MODEL, prompt="Hello", max_tokens=200, stream=True,
                    extra_body={"ignore_eos": True})
        streams = [client.completions.create(**long) for _ in range(2)]
        for stream in streams:
            next(iter(stream))  # both are running
        with pytest.raises(openai.RateLimitError, match="limit of 2"):
            client.completions.create(**GOOD)
        # a call that could never fit is not told to retry
        with pytest.raises(openai.BadRequestError, match="more than the server ever holds"):
            client.completions.create(**{**GOOD, "prompt": ["a", "b", "c"]})
        for stream in streams:
            stream.close()
        assert wait_until(lambda: server.llm.num_unfinished == 0
                          and server.llm.stats()["kv_blocks_used"] == 0)
        assert client.completions.create(**GOOD).choices
