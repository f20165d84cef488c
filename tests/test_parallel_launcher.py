"""Ranks started by a launcher (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, as mpirun,
Slurm or torchrun set them): joining (a peer that never comes, a port already taken) and
`kiln serve` on every rank (its engine process, how the ranks end). Real processes and
signals on loopback, each bounded by a timeout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from kiln.build import build
from kiln.config import BuildConfig
from kiln.distributed.launch import free_port
from tests.test_parallel_failures import _alive, _end
from tests.test_parallel_runtime import CFG, ENV, _children, _descendants, assert_unhealthy
from tests.test_serve_support import start_kiln_serve, tiny_chat_checkpoint

RUN = ["-m", "kiln", "run", "--prompt", "Hi", "--max-tokens", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    return build(tiny_chat_checkpoint(), tmp_path_factory.mktemp("launcher") / "tp2",
                 BuildConfig(**CFG, tp_size=2), progress=False)


def _rank_env(rank: int, port: int, **extra: str) -> dict[str, str]:
    env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **extra}
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    return env


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_peer_never_comes_says_so_then_gives_up(tp2, rank):
    """Rank 0 without rank 1 (or rank 1 without rank 0) said nothing for 10 minutes, then
    printed a DistStoreError traceback: now it says what it waits for, where, and gives up
    with one line after KILN_JOIN_TIMEOUT seconds."""
    port = free_port()
    run = subprocess.run([sys.executable, *RUN[:3], str(tp2), *RUN[3:]], capture_output=True,
                         text=True, timeout=60,
                         env=_rank_env(rank, port, KILN_JOIN_TIMEOUT="3"))
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 2, run.stderr
    waiting = "1 of 2 ranks" if rank == 0 else "rank 0 (it hosts the ranks' store)"
    assert lines[0].startswith(f"kiln: rank {rank}: waiting for {waiting} at "
                               f"127.0.0.1:{port} ("), run.stderr
    assert lines[1].startswith("kiln: error: ") and "in 3 s" in lines[1] and \
        "KILN_JOIN_TIMEOUT" in lines[1], run.stderr


def test_master_port_in_use_is_one_line(tp2):
    """Rank 0 cannot host the store on a port another process listens on: one line (it
    was a 36-line DistNetworkError EADDRINUSE traceback)."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, *RUN[:3], str(tp2), *RUN[3:]],
                             capture_output=True, text=True, timeout=60,
                             env=_rank_env(0, port))
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == f"kiln: error: port {port} (MASTER_PORT) is in use on this " \
        "machine: another process listens on it; give rank 0's store a free port", run.stderr


def test_join_timeout_must_be_seconds(monkeypatch):
    from kiln.distributed.rendezvous import join_timeout
    from kiln.errors import KilnError

    monkeypatch.setenv("KILN_JOIN_TIMEOUT", "2.5")
    assert join_timeout() == 2.5
    for bad in ("soon", "0", "-1", "nan"):
        monkeypatch.setenv("KILN_JOIN_TIMEOUT", bad)
        with pytest.raises(KilnError, match="KILN_JOIN_TIMEOUT"):
            join_timeout()


def _serve_two_ranks(engine, **env: str) -> tuple[subprocess.Popen, subprocess.Popen, str]:
    """`kiln serve` on both ranks (rank 0 serves HTTP), once rank 0 answers /health."""
    port = free_port()
    rank1 = subprocess.Popen([sys.executable, "-m", "kiln", "serve", str(engine), "--port",
                              str(free_port()), "--device", "cpu"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_rank_env(1, port, **env),
                             start_new_session=True)
    try:
        rank0, url = start_kiln_serve(engine, "--served-model-name", "tp2",
                                      env=_rank_env(0, port))
    except BaseException:
        _kill_all(rank1)
        raise
    return rank0, rank1, url


def _kill_all(*procs: subprocess.Popen) -> None:
    for proc in procs:
        for pid in reversed(_descendants(proc.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.stdout is not None and not proc.stdout.closed:  # not read to the end yet
            proc.communicate(timeout=30)


def test_serve_rank_1_killed_takes_its_engine_and_rank_0_turns_unhealthy(tp2):
    """The `kiln serve` of rank 1 killed: its engine process (which serves rank 0's engine
    and never reads its command pipe) was orphaned and served on, so rank 0 saw nothing
    and /health stayed 200. Now it dies with its parent, and the idle rank 0, which
    pings its ranks every second, turns unhealthy."""
    rank0, rank1, url = _serve_two_ranks(tp2)
    try:
        engines = [p for p in _children(rank1.pid)  # not multiprocessing's resource tracker
                   if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        assert len(engines) == 1
        os.kill(rank1.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _alive(engines[0]):
            assert time.monotonic() < deadline, "rank 1's engine process was orphaned"
            time.sleep(0.1)
        assert_unhealthy(url)
    finally:
        _kill_all(rank0, rank1)


@pytest.mark.parametrize("torchrun", [False, True])
def test_serve_rank_1_ends_quietly_when_rank_0_stops(tp2, torchrun):
    """Ctrl-C of rank 0's server (a normal stop): rank 1's engine process exits when rank
    0 closes the engine; its server said "the engine process exited (exit code 0) before
    it was ready" and exited 2. Now it says rank 0 stopped and exits 0; under torchrun 1,
    so that its agent does not wait minutes in its exit barrier for the stopped node."""
    rank0, rank1, url = _serve_two_ranks(tp2, TORCHELASTIC_RUN_ID="t" if torchrun else "")
    try:
        reply = httpx.post(url + "/v1/completions", json={"model": "tp2", "prompt": "Hi",
                                                           "max_tokens": 3}, timeout=30)
        assert reply.status_code == 200
        rank0.send_signal(signal.SIGINT)
        _, stderr0 = _end(rank0, timeout=30)
        _, stderr1 = _end(rank1, timeout=30)
        assert rank0.returncode == 130, stderr0
        assert rank1.returncode == (1 if torchrun else 0), stderr1
        assert stderr1.strip() == "kiln: rank 1: rank 0 stopped the engine; this rank is " \
            "done" + (" (exit 1, so that torchrun ends this node now)" if torchrun else ""), \
            stderr1
    finally:
        _kill_all(rank0, rank1)
