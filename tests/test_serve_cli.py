"""`kiln serve` as a user runs it: a subprocess on a free port, stopped with Ctrl-C."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import httpx
import pytest

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


def test_kiln_serve_refuses_a_port_it_cannot_listen_on_before_loading():
    """A port in use, a port out of range, a host that does not resolve: one line and a
    non-zero exit, before the model loads (the engine path given does not exist, so a
    load would fail with another message)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = {(str(port), "127.0.0.1"): "Address already in use; choose another --port",
                 ("70000", "127.0.0.1"): "expected a port number (0-65535), got '70000'",
                 ("0", "nosuch.invalid"): "give --host an address of this machine"}
        for (port_arg, host), message in cases.items():
            run = subprocess.run([sys.executable, "-m", "kiln", "serve", "/nonexistent/engine",
                                  "--host", host, "--port", port_arg],
                                 capture_output=True, text=True, timeout=120)
            assert run.returncode == 2, run.stderr
            assert message in run.stderr and "Traceback" not in run.stderr, run.stderr
            assert "nonexistent" not in run.stderr, run.stderr


def test_kiln_triton_serve_names_the_busy_port(tmp_path):
    """`kiln triton-serve` checks its three ports before Triton starts (whose own message
    comes after its models load): the busy one is named by its flag."""
    from kiln.distributed.launch import free_port
    from tests.triton_support import triton_env_dir

    if not (triton_env_dir() / "pyvenv.cfg").is_file():
        pytest.skip(f"no Triton env at {triton_env_dir()} (make setup makes it)")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "kiln", "triton-serve", str(tmp_path),
                              "--triton-env", str(triton_env_dir()), "--grpc-port", str(port),
                              "--http-port", str(free_port()), "--metrics-port",
                              str(free_port())], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (f"kiln: error: cannot listen on 127.0.0.1:{port}: Address "
                                  "already in use; choose another --grpc-port"), run.stderr
