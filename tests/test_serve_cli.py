"""`kiln serve` as a user runs it: a subprocess on a free port, stopped with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from tests.test_serve_support import MODEL, tiny_chat_engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kiln_serve_subprocess():
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "KILN_API_KEY": "k"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "serve", str(tiny_chat_engine()), "--port",
         str(port), "--served-model-name", MODEL, "--device", "cpu", "--max-queue", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401  # the key from $KILN_API_KEY
        reply = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k"},
                           json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}).json()
        assert reply["usage"]["completion_tokens"] <= 2
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr  # a clean stop by Ctrl-C, as `kiln run` reports it
    assert "Application shutdown complete" in stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(line["route"] == "/v1/completions" and line["status"] == "ok" for line in lines)
