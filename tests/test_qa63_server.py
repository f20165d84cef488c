"""Serving QA (63rd session), the HTTP frame around the routes: a 405 names the methods
its route takes (Allow), an engine failure in the middle of an answer is counted as an
error in kiln_requests_finished_total (it was counted as an abort), and an engine process
that must be killed (Ctrl-C while it loads) is killed at once (SIGTERM, which it ignores,
made that wait 5 s)."""

from __future__ import annotations

import time

import httpx
import pytest

from kiln.serve.engine_proc import EngineProcess
from tests.test_serve_support import MODEL, metric, tiny_chat_engine


@pytest.mark.parametrize(("method", "path", "allow", "shape"), [
    ("DELETE", "/v1/models", {"GET"}, "openai"),
    ("GET", "/v1/completions", {"POST"}, "openai"),
    ("PUT", "/health", {"GET"}, "openai"),
    ("GET", f"/v2/models/{MODEL}/generate", {"POST"}, "kserve"),
])
def test_405_names_the_allowed_methods(server, method, path, allow, shape):
    response = httpx.request(method, server.url + path)
    assert response.status_code == 405, response.text
    assert {m.strip() for m in response.headers["allow"].split(",")} == allow
    body = response.json()
    if shape == "openai":
        assert body["error"]["type"] == "invalid_request_error"
        assert f"method {method} is not allowed" in body["error"]["message"]
    else:
        assert body == {"error": f"method {method} is not allowed here"}


def test_429_still_says_when_to_retry():
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from kiln.serve.errors import APIError, install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/v1/busy")
    async def busy() -> None:
        raise APIError(429, "busy", code="queue_full")

    response = TestClient(app).get("/v1/busy")
    assert response.status_code == 429 and response.headers["retry-after"] == "1"


def _finished(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    return {reason: metric(text, f'kiln_requests_finished_total{{finish_reason="{reason}"}}',
                           0.0) for reason in ("stop", "length", "abort", "error")}


def test_engine_failure_mid_answer_counts_as_an_error(server, monkeypatch):
    engine = server.llm.engine
    real_step, steps = engine.step, []

    def failing_step():
        steps.append(1)
        if len(steps) == 3:  # after the first tokens came out
            raise RuntimeError("simulated device fault")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    before = _finished(server)
    response = httpx.post(server.v1 + "/completions", timeout=60, json={
        "model": MODEL, "prompt": "Hi", "max_tokens": 20, "ignore_eos": True, "n": 2})
    assert response.status_code == 500, response.text
    after = _finished(server)
    assert after["error"] == before["error"] + 2, (before, after)  # both choices
    assert after["abort"] == before["abort"]
    monkeypatch.undo()

    # A client that hangs up is still an abort.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.v1 + "/completions", timeout=0.3, json={
            "model": MODEL, "prompt": "Hi", "max_tokens": 240, "ignore_eos": True})
    deadline = time.monotonic() + 10
    while server.llm.num_unfinished and time.monotonic() < deadline:
        time.sleep(0.02)
    last = _finished(server)
    assert last["abort"] == after["abort"] + 1 and last["error"] == after["error"]


def test_an_engine_process_is_killed_at_once(monkeypatch):
    """Ctrl-C while `kiln serve` waits for the engine process to load: the child ignores
    SIGINT and SIGTERM, so it must get SIGKILL at once, not after a 5 s wait."""
    real_wait = EngineProcess._wait_ready

    def interrupted(self):
        real_wait(self)  # the child is loaded, ignoring SIGTERM
        self.loaded_at = time.monotonic()
        raise KeyboardInterrupt

    monkeypatch.setattr(EngineProcess, "_wait_ready", interrupted)
    made = []
    monkeypatch.setattr(EngineProcess, "_kill", lambda self, kill=EngineProcess._kill: (
        made.append(self), kill(self)))
    with pytest.raises(KeyboardInterrupt):
        EngineProcess(tiny_chat_engine(), None, "warning", device="cpu")
    took = time.monotonic() - made[0].loaded_at
    assert not made[0]._process.is_alive()
    assert took < 2.0, took


def test_drain_waits_for_a_request_whose_body_is_still_coming(monkeypatch):
    """SIGTERM while a request is still being received (its headers came, its body not
    yet): the drain waits for it as for a running one (it passed the door before the
    drain began). It used to count only requests the engine held, so the server stopped
    at once and gave the request only uvicorn's 5 s to finish: a longer one was cut."""
    import json
    import signal
    import socket
    import threading

    from kiln.runtime.engine import LLMEngine, RuntimeConfig
    from kiln.serve import AsyncLLM, ServerConfig, build_app
    from kiln.serve.server import DrainingServer, _uvicorn_config

    llm = AsyncLLM(LLMEngine(tiny_chat_engine(), RuntimeConfig(device="cpu")))
    real_step = llm.engine.step

    def slow_step():
        time.sleep(0.1)  # 60 tokens: 6 s, longer than uvicorn's own 5 s
        return real_step()

    monkeypatch.setattr(llm.engine, "step", slow_step)
    config = ServerConfig(port=0, served_model_name=MODEL, log_level="warning",
                          shutdown_timeout=30)
    app = build_app(llm, config)
    server = DrainingServer(_uvicorn_config(app, config), app.state.kiln, 30)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 60,
                           "ignore_eos": True}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
            time.sleep(0.3)  # the request is in the app, waiting for its body
            server.handle_exit(signal.SIGTERM, None)
            time.sleep(0.5)
            assert not server.should_exit, "the drain ended with a request in flight"
            sock.sendall(body)
            reply = b""
            while not reply.endswith(b"}") or b"\r\n\r\n" not in reply:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), reply[:300]
        assert json.loads(payload)["usage"]["completion_tokens"] == 60
        thread.join(15)
        assert not thread.is_alive()  # and then the server stopped
    finally:
        server.should_exit = True
        thread.join(15)
        llm.shutdown()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_hang_up_before_the_first_token_counts_as_an_abort(server, monkeypatch, stream):
    """A client that leaves while its request is still in its prompt step (no output yet)
    is an abort too; it went uncounted (so the hang-up tests failed on a loaded machine,
    where the first token took longer than their 0.3 s)."""
    engine, real_step = server.llm.engine, server.llm.engine.step

    def slow_step():
        time.sleep(1.0)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)
    before = _finished(server)
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": stream}
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=0.3) as r:
            for _ in r.iter_lines():
                pass
    deadline = time.monotonic() + 10
    while _finished(server)["abort"] == before["abort"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = _finished(server)
    assert after["abort"] == before["abort"] + 1, (before, after)
    assert after["error"] == before["error"]
