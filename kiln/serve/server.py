"""Run the app under uvicorn: in the foreground (`kiln serve`) or in a background thread."""

from __future__ import annotations

import logging
import sys
import threading
import time

import uvicorn
from fastapi import FastAPI

from kiln.serve.app import ServerConfig


def configure_logging(level: str) -> None:
    """kiln's own loggers to stderr; request lines are JSON already, so print them bare."""
    logger = logging.getLogger("kiln")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def _uvicorn_config(app: FastAPI, config: ServerConfig) -> uvicorn.Config:
    # No access log: every API call gets one structured line from kiln.serve.requests.
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                          access_log=False, timeout_graceful_shutdown=5)


def run_server(app: FastAPI, config: ServerConfig) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    configure_logging(config.log_level)
    uvicorn.Server(_uvicorn_config(app, config)).run()


class ServerThread:
    """Serve `app` from a background thread, for tests and notebooks.

        with ServerThread(app) as server:   # port 0: any free port
            httpx.get(server.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        self.server = uvicorn.Server(_uvicorn_config(
            app, ServerConfig(host=host, port=port, log_level=log_level)))
        self._thread = threading.Thread(target=self.server.run, name="kiln-http", daemon=True)
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
