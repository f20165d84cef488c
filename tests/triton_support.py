"""A real NVIDIA Triton Inference Server for the tests (no tests here).

`tritonserver` comes from the `nvidia-pytriton` wheel in the Triton env, a venv of its
own (`make setup` makes `.venv-triton` beside `.venv`; `$KILN_TRITON_ENV` overrides).
The server is started as a user starts it, `kiln triton-serve REPO --triton-env ENV`
(which then becomes tritonserver), on free loopback ports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_serve_support import metric


def triton_env_dir() -> Path:
    default = Path(sys.prefix).with_name(Path(sys.prefix).name + "-triton")
    return Path(os.environ.get("KILN_TRITON_ENV") or default)


@dataclass
class TritonServer:
    http: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT
    metrics_url: str
    repository: Path
    process: subprocess.Popen
    log: Path

    def metric(self, name: str, default: float | None = None) -> float:
        import httpx

        return metric(httpx.get(self.metrics_url).text, name, default)

    def kiln_gauge(self, stat: str, model: str = "kiln") -> float:
        return self.metric(f'kiln_{stat}{{model="{model}"}}')


@contextlib.contextmanager
def run_tritonserver(repository: Path, log: Path, timeout: float = 240) -> Iterator[TritonServer]:
    import httpx

    from kiln.distributed.launch import free_port

    if not (triton_env_dir() / "pyvenv.cfg").is_file():
        pytest.skip(f"no Triton env at {triton_env_dir()} (make setup makes it; or set "
                    "KILN_TRITON_ENV to a venv with nvidia-pytriton and numpy<2)")
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    argv = [sys.executable, "-m", "kiln", "triton-serve", str(repository),
            "--triton-env", str(triton_env_dir()), "--http-port", str(http_port),
            "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    server = TritonServer(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}",
                          f"http://127.0.0.1:{metrics_port}/metrics", repository, proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"tritonserver exited:\n{log.read_text()[-4000:]}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(server.http + "/v2/health/ready").status_code == 200:
                    break
            assert time.monotonic() < deadline, "tritonserver did not become ready"
            time.sleep(0.25)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
