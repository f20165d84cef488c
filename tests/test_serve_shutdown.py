"""Graceful shutdown of `kiln serve` (a subprocess): SIGTERM drains the running requests,
refuses new ones with 503, aborts what is left at --shutdown-timeout, and exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx

from tests.test_serve_support import MODEL, start_kiln_serve, tiny_chat_engine

# 4 choices x 200 tokens: a few seconds of work for the tiny model on a CPU.
N = 4
LONG = {"model": MODEL, "prompt": "Hi", "max_tokens": 200, "ignore_eos": True, "n": N,
        "temperature": 1.0, "seed": 0, "stream": True}


def _start(*args: str) -> tuple[subprocess.Popen, str]:
    return start_kiln_serve(tiny_chat_engine(), "--served-model-name", MODEL, *args,
                            env={"OMP_NUM_THREADS": "1"})  # steadier on a busy machine


class _Stream(threading.Thread):
    """A streaming completion read in the background; `started` once the first chunk came."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.started = threading.Event()
        self.chunks: list[dict] = []
        self.done = False

    def run(self) -> None:
        with httpx.stream("POST", self.url + "/v1/completions", json=LONG, timeout=300) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    self.chunks.append(json.loads(line[6:]))
                    self.started.set()

    def finish_reasons(self) -> list[str]:
        return sorted(c["finish_reason"] for chunk in self.chunks for c in chunk["choices"]
                      if c["finish_reason"])

    def text_lengths(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for chunk in self.chunks:
            for c in chunk["choices"]:
                out[c["index"]] = out.get(c["index"], 0) + len(c["text"])
        return out


def _stop(proc: subprocess.Popen) -> str:
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return stderr


def test_sigterm_drains_running_requests_and_refuses_new_ones():
    proc, url = _start("--shutdown-timeout", "300")
    try:
        stream = _Stream(url)
        stream.start()
        assert stream.started.wait(30)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        assert stream.is_alive(), "the long request ended too soon for this test"
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "shutting down"
        assert httpx.get(url + "/v2/health/ready").status_code == 503
        refused = httpx.post(url + "/v1/completions",
                             json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "shutting_down"
        generate = httpx.post(url + f"/v2/models/{MODEL}/generate", json={"text_input": "Hi"})
        assert generate.status_code == 503 and "shutting down" in generate.json()["error"]
        stream.join(300)
    finally:
        stderr = _stop(proc)
    assert stream.done
    assert stream.finish_reasons() == ["length"] * N, stderr  # every choice ran to its end
    assert proc.returncode == 0, stderr
    assert "shutting down: 1 requests running" in stderr


def test_shutdown_timeout_aborts_what_is_left():
    proc, url = _start("--shutdown-timeout", "0.5")
    try:
        stream = _Stream(url)
        stream.start()
        assert stream.started.wait(30)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stream.join(300)
        took = time.monotonic() - sent
    finally:
        stderr = _stop(proc)
    assert stream.done, "the stream must end properly, with [DONE]"
    assert stream.finish_reasons() == ["abort"] * N, stderr
    assert took < 10, took
    assert proc.returncode == 0, stderr
    assert "shutdown timeout: aborting 1 requests" in stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(line["route"] == "/v1/completions" and line.get("finish_reasons") ==
               ["abort"] * N for line in lines), stderr


def test_ctrl_c_when_idle_stops_at_once():
    proc, url = _start()
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stderr = _stop(proc)
    assert proc.returncode == 130, stderr
    assert time.monotonic() - started < 10
