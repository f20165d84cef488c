"""`kiln serve` as a user runs it: a subprocess on a free port, stopped with Ctrl-C."""

from __future__ import annotations

import json
import signal

import httpx

from tests.test_serve_support import MODEL, start_kiln_serve, tiny_chat_engine


def test_kiln_serve_subprocess():
    proc, url = start_kiln_serve(tiny_chat_engine(), "--served-model-name", MODEL,
                                 "--max-queue", "4", env={"KILN_API_KEY": "k"})
    try:
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
