"""Where the ranks of a multi-rank engine meet: a TCP store that rank 0 hosts (at
MASTER_ADDR:MASTER_PORT under a launcher, at a free loopback port for the workers kiln
spawns). Each rank checks in; until all have, every rank says now and then what it waits
for, and gives up with one line after KILN_JOIN_TIMEOUT seconds (default 600). A port
that another process holds is one line too, not a socket error's traceback."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from datetime import timedelta
from urllib.parse import urlparse

import torch.distributed as dist

from kiln.errors import KilnError

TIMEOUT_VARIABLE = "KILN_JOIN_TIMEOUT"
_JOINED = "kiln/joined"
_EVERY = 30.0  # seconds between two "waiting for" lines


def join_timeout() -> float:
    """Seconds a rank waits for the others to join (KILN_JOIN_TIMEOUT, default 600)."""
    raw = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not raw:
        return 600.0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise KilnError(f"{TIMEOUT_VARIABLE}={raw!r} must be a number of seconds above 0")
    return seconds


def address(init_method: str) -> tuple[str, int]:
    """(host, port) of the store: from tcp://HOST:PORT, or MASTER_ADDR / MASTER_PORT."""
    if init_method != "env://":
        url = urlparse(init_method)
        return url.hostname or "127.0.0.1", int(url.port or 0)
    host = os.environ.get("MASTER_ADDR", "").strip()
    port = os.environ.get("MASTER_PORT", "").strip()
    if not host or not port:
        raise KilnError("RANK and WORLD_SIZE are set (a launcher started this process), but "
                        "MASTER_ADDR / MASTER_PORT are not: set them to rank 0's host and a "
                        "free port on it, the same for every rank")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise KilnError(f"MASTER_PORT={port!r} is not a port: give a free TCP port on rank "
                        "0's host (1-65535), the same for every rank")
    return host, int(port)


class _Notice(threading.Thread):
    """Prints what this rank still waits for, after `first` seconds and then every _EVERY."""

    def __init__(self, rank: int, where: str, first: float) -> None:
        super().__init__(daemon=True, name="kiln-join-notice")
        self.rank, self.where, self.first = rank, where, first
        self.waiting_for = "rank 0 (it hosts the ranks' store)" if rank else ""
        self.done = threading.Event()
        self.since = time.monotonic()

    def run(self) -> None:
        wait = self.first
        while not self.done.wait(wait):
            if self.waiting_for:
                print(f"kiln: rank {self.rank}: waiting for {self.waiting_for} at "
                      f"{self.where} ({time.monotonic() - self.since:.0f} s)",
                      file=sys.stderr, flush=True)
            wait = _EVERY


def store(host: str, port: int, rank: int, world: int, timeout: float,
          quiet: bool = False) -> dist.Store:
    """The ranks' store, once all `world` ranks have checked in (a KilnError if they do
    not within `timeout` seconds, or if the store cannot be hosted or reached). `quiet`:
    no "waiting for" lines (the workers kiln spawned: rank 0 watches their processes)."""
    where = f"{host}:{port}"
    notice = _Notice(rank, where, min(5.0, timeout / 2))
    if not quiet:
        notice.start()
    deadline = time.monotonic() + timeout
    try:
        if rank != 0:  # quietly: the store's client logs a C++ trace per failed connect
            _await_listener(host, port, deadline, timeout)
        else:  # its store's client connects to MASTER_ADDR: a name that does not resolve
            _await_resolved(host, notice, deadline, timeout)  # logged a C++ trace a retry
        try:
            tcp = dist.TCPStore(host, port, world, is_master=rank == 0,
                                timeout=timedelta(seconds=timeout), wait_for_workers=False)
        except Exception as e:  # DistNetworkError (port taken, no rank 0), DistStoreError
            raise KilnError(_store_error(e, rank, where, timeout)) from None
        try:
            tcp.add(_JOINED, 1)
            while (joined := tcp.add(_JOINED, 0)) < world:
                notice.waiting_for = f"{world - joined} of {world} ranks"
                if time.monotonic() > deadline:
                    raise KilnError(
                        f"only {joined} of {world} ranks came to {where} in {timeout:.0f} s; "
                        f"start all {world} (RANK 0-{world - 1}) with the same MASTER_ADDR "
                        f"and MASTER_PORT, or set {TIMEOUT_VARIABLE} to wait longer")
                time.sleep(0.05)
        except KilnError:
            raise
        except Exception as e:  # rank 0, which holds the store, went away meanwhile
            raise KilnError(f"rank {rank} lost the ranks' store at {where} while the ranks "
                            f"joined ({_first_line(e)})") from None
    finally:
        notice.done.set()
    return tcp


def _await_listener(host: str, port: int, deadline: float, timeout: float) -> None:
    """Wait until something listens at host:port (rank 0's store, once it started)."""
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise KilnError(f"rank 0's store at {host}:{port} did not answer in "
                                f"{timeout:.0f} s; start rank 0 with the same MASTER_ADDR "
                                f"and MASTER_PORT, or set {TIMEOUT_VARIABLE} to wait longer"
                                ) from None
            time.sleep(0.2)


def _await_resolved(host: str, notice: _Notice, deadline: float, timeout: float) -> None:
    """Wait until MASTER_ADDR resolves (a cluster's DNS may add rank 0's name late)."""
    while True:
        try:
            socket.getaddrinfo(host, None)
            notice.waiting_for = ""
            return
        except OSError as e:
            notice.waiting_for = f"MASTER_ADDR {host} to resolve"
            if time.monotonic() > deadline:
                raise KilnError(f"MASTER_ADDR {host} does not resolve on rank 0 ("
                                f"{e.strerror or e}) after {timeout:.0f} s: set it to rank "
                                "0's host name or address, the same for every rank") from None
            time.sleep(0.2)


def _store_error(error: BaseException, rank: int, where: str, timeout: float) -> str:
    text = str(error)
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        return (f"port {where.rsplit(':', 1)[1]} (MASTER_PORT) is in use on this machine: "
                "another process listens on it; give rank 0's store a free port")
    if rank and "timed out" in text.lower():
        return (f"rank 0's store at {where} did not answer in {timeout:.0f} s; start rank 0 "
                f"with the same MASTER_ADDR and MASTER_PORT, or set {TIMEOUT_VARIABLE} to "
                "wait longer")
    return f"rank {rank} cannot {'host' if rank == 0 else 'reach'} the ranks' store at " \
           f"{where} ({_first_line(error)})"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]
