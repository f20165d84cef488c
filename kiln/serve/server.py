"""Run the app under uvicorn: in the foreground (`kiln serve`) or in a background thread.

`kiln serve` stops gracefully. The first SIGTERM or Ctrl-C starts a drain: the listener
stays open but every new request gets 503 (`/health` and the readiness probes too), while
the running ones go on for up to `shutdown_timeout` seconds. Then whatever still runs is
aborted: each of its responses ends normally with finish_reason "abort". Then uvicorn
stops. A second signal ends the drain at once. The exit status is 0 after SIGTERM, and
130 after Ctrl-C (as `kiln run` reports an interrupt).
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from kiln.serve.app import ServerConfig
from kiln.serve.context import ServeContext


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


def check_listen(host: str, port: int, flag: str = "--port") -> None:
    """Fail in one line, before a model loads for minutes, when the server could not listen
    on host:port (a port in use, an address not of this machine). Binds and closes what
    uvicorn will bind: every address the host resolves to, with SO_REUSEADDR as asyncio's
    servers set it (a port left in TIME_WAIT passes, a listening one does not)."""
    from kiln.errors import KilnError

    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise KilnError(f"cannot listen on {host}:{port}: {e.strerror}; give --host an "
                        "address of this machine (127.0.0.1, 0.0.0.0, ...)") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                hint = f"choose another {flag}" if e.errno == errno.EADDRINUSE else \
                    f"check --host and {flag}"
                raise KilnError(f"cannot listen on {host}:{port}: {e.strerror or e}; "
                                f"{hint}") from None


log = logging.getLogger("kiln.serve")

_ABORT_GRACE_S = 5.0  # after the abort: time for the streams to send their last chunks


class DrainingServer(uvicorn.Server):
    """uvicorn, but a stop signal first drains the app's requests (see the module doc)."""

    def __init__(self, config: uvicorn.Config, context: ServeContext,
                 shutdown_timeout: float) -> None:
        super().__init__(config)
        self.context = context
        self.shutdown_timeout = shutdown_timeout
        self._deadline: float | None = None  # set when the drain starts
        self._aborted_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:  # drained already: uvicorn's own (a second Ctrl-C forces)
            if sig == signal.SIGINT:
                super().handle_exit(sig, frame)
            return
        if sig == signal.SIGINT and sig not in self._captured_signals:
            self._captured_signals.append(sig)  # re-raised after shutdown: exit status 130
        if self._deadline is None:
            self.context.draining = True
            self._deadline = time.monotonic() + self.shutdown_timeout
            log.info("kiln: shutting down: %d requests running, waiting up to %gs for "
                     "them (send the signal again to stop now)",
                     self.context.llm.num_unfinished, self.shutdown_timeout)
        else:
            self._deadline = min(self._deadline, time.monotonic())

    async def on_tick(self, counter: int) -> bool:
        if self._deadline is not None and not self.should_exit:
            self.should_exit = self._drained()
        return await super().on_tick(counter)

    def _drained(self) -> bool:
        """Whether to stop: nothing runs (neither in the engine nor in HTTP: a request
        still being received or prepared, an answer still being written), or the abort
        at the deadline has had its grace."""
        llm, now = self.context.llm, time.monotonic()
        if llm.num_unfinished == 0 and self.context.metrics.in_flight == 0 or not llm.alive:
            return True
        if self._aborted_at is None and now >= (self._deadline or now):
            log.info("kiln: shutdown timeout: aborting %d requests", llm.num_unfinished)
            llm.finish_all()
            self._aborted_at = now
        return self._aborted_at is not None and now >= self._aborted_at + _ABORT_GRACE_S


def run_server(app: FastAPI, config: ServerConfig) -> None:
    """Serve until stopped (Ctrl-C / SIGTERM), draining running requests first."""
    configure_logging(config.log_level)
    server = DrainingServer(_uvicorn_config(app, config), app.state.kiln,
                            config.shutdown_timeout)
    server.run()
    # uvicorn re-raises a captured Ctrl-C once it has shut down; asyncio.run turns that into
    # KeyboardInterrupt only if its main task has not finished first (under load it may
    # have): the exit status after Ctrl-C is 130 either way.
    if signal.SIGINT in server._captured_signals:
        raise KeyboardInterrupt


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
