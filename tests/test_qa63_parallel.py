"""QA of the multi-rank runtime on the CPU (63rd session): launcher environments with odd
values, a single-rank engine under a launcher of several processes, and an engine whose
workers were started from a thread that then ended. Real processes, each bounded by a
timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kiln.build import build
from kiln.config import BuildConfig
from kiln.distributed.launch import free_port
from kiln.errors import KilnError
from tests.test_parallel_failures import _alive
from tests.test_parallel_runtime import CFG, ENV, _children, _descendants
from tests.test_serve_support import tiny_chat_checkpoint

RUN = ["-m", "kiln", "run", "--prompt", "Hi", "--max-tokens", "2", "--device", "cpu"]
_LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_USE_AGENT_STORE")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa63")
    hf = tiny_chat_checkpoint()
    return {tp: build(hf, root / f"tp{tp}", BuildConfig(**CFG, tp_size=tp), progress=False)
            for tp in (1, 2)}


def _kiln_run(engine, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in ENV.items() if k not in _LAUNCHER}
    return subprocess.run([sys.executable, *RUN[:3], str(engine), *RUN[3:]],
                          capture_output=True, text=True, timeout=timeout,
                          env={**base, **env})


@pytest.fixture
def launcher_env(monkeypatch):
    for name in _LAUNCHER:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env,says", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' is not a whole number"),
    ({"RANK": "", "WORLD_SIZE": "2"}, "RANK='' is not a whole number"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not a whole"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be the number of ranks"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is outside WORLD_SIZE=2"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1 is outside WORLD_SIZE=2"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1 must be 0 or more"),
])
def test_launcher_variables_no_launcher_sets_are_one_error(launcher_env, env, says):
    """RANK=abc (or LOCAL_RANK=x) was a ValueError traceback from int(); RANK past
    WORLD_SIZE joined and waited the whole join timeout for a rank 0 that hosts a store
    of 2 ranks; one of RANK / WORLD_SIZE alone was ignored (kiln spawned its own workers
    beside whatever the launcher started)."""
    from kiln.distributed.launch import launcher_rank

    for name, value in env.items():
        launcher_env.setenv(name, value)
    with pytest.raises(KilnError, match=says.replace("(", r"\(")):
        launcher_rank()


def test_launcher_variables_that_are_fine(launcher_env):
    from kiln.distributed.launch import launcher_rank

    assert launcher_rank() is None
    launcher_env.setenv("RANK", " 1")
    launcher_env.setenv("WORLD_SIZE", "4")
    assert launcher_rank() == (1, 4, 1)  # LOCAL_RANK defaults to the rank
    launcher_env.setenv("LOCAL_RANK", "0")
    assert launcher_rank() == (1, 4, 0)


@pytest.mark.parametrize("port", ["abc", "70000", "0", "-5"])
def test_master_port_that_is_no_port_says_so(launcher_env, port):
    """MASTER_PORT=abc said "MASTER_ADDR / MASTER_PORT are not [set]"; 70000 reached
    TCPStore, whose error was its pybind "incompatible constructor arguments" line."""
    from kiln.distributed.rendezvous import address

    launcher_env.setenv("MASTER_ADDR", "127.0.0.1")
    launcher_env.setenv("MASTER_PORT", port)
    with pytest.raises(KilnError, match=rf"^MASTER_PORT='{port}' is not a port"):
        address("env://")
    launcher_env.setenv("MASTER_PORT", "29500")
    assert address("env://") == ("127.0.0.1", 29500)


def test_bad_rank_through_kiln_run_is_one_line(engines):
    run = _kiln_run(engines[2], RANK="abc", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()))
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == "kiln: error: RANK='abc' is not a whole number (a launcher " \
        "sets RANK, WORLD_SIZE and LOCAL_RANK to numbers)", run.stderr


def test_master_addr_that_does_not_resolve_is_one_line_on_rank_0(engines):
    """Rank 0 with a MASTER_ADDR that does not resolve: its store's client retried with a
    C++ warning each time, then a 40-line C++ stack trace came before kiln's line. Now it
    waits quietly (a cluster's DNS may add the name late), says what it waits for, and
    gives up with one line."""
    run = _kiln_run(engines[2], RANK="0", WORLD_SIZE="2", MASTER_ADDR="kiln-no-host.invalid",
                    MASTER_PORT=str(free_port()), KILN_JOIN_TIMEOUT="2")
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert lines[-1].startswith("kiln: error: MASTER_ADDR kiln-no-host.invalid does not "
                                "resolve on rank 0 ("), run.stderr
    assert all(x.startswith("kiln: rank 0: waiting for MASTER_ADDR kiln-no-host.invalid to "
                            "resolve at ") for x in lines[:-1]), run.stderr


def test_single_rank_engine_under_a_launcher_of_two_is_one_line(engines):
    """A one-rank engine under a launcher that started two processes ran the whole
    engine in each (both on GPU 0, both printing or serving): the docs say the number of
    processes must equal tp x pp, and kiln says so, on every rank."""
    port = str(free_port())
    for rank in ("0", "1"):
        run = _kiln_run(engines[1], RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port)
        assert run.returncode == 2 and run.stdout == "", run.stdout + run.stderr
        assert run.stderr.strip() == f"kiln: error: {engines[1]} is built for 1 rank (tp x " \
            "pp), but the launcher started 2 (WORLD_SIZE); launch 1 process", run.stderr
    fine = _kiln_run(engines[1], RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port)
    assert fine.returncode == 0 and fine.stdout.strip(), fine.stderr


# Loads the engine on a thread that then ends (a pool's, a web framework's start-up), then
# generates on the main thread; says "ready" with the text, and waits.
_THREAD = textwrap.dedent("""
    import sys, threading, time
    from kiln import LLM, SamplingParams
    if __name__ == "__main__":
        box = {}
        loader = threading.Thread(target=lambda: box.update(llm=LLM(sys.argv[1], device="cpu")))
        loader.start()
        loader.join()
        time.sleep(0.5)
        out = box["llm"].generate("Hello there", SamplingParams(max_tokens=4, temperature=0))
        print("ready", out[0].outputs[0].text, flush=True)
        time.sleep(60)
""")


def test_an_engine_loaded_on_a_thread_keeps_its_workers_until_its_process_ends(engines,
                                                                              tmp_path):
    """The workers asked the kernel for SIGKILL when their parent *thread* ended
    (PR_SET_PDEATHSIG): an LLM loaded on a thread that then ended lost its workers, and
    its first generate() was `worker rank 1 died (killed by SIGKILL)`. Now such workers
    watch for being orphaned instead: they live while rank 0's process does, and end
    within about a second of its death."""
    script = tmp_path / "thread.py"
    script.write_text(_THREAD)
    proc = subprocess.Popen([sys.executable, str(script), str(engines[2])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in ENV.items() if k not in _LAUNCHER})
    workers: list[int] = []
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready "), line + proc.communicate(timeout=30)[1]
        workers += [p for p in _children(proc.pid)
                    if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        assert len(workers) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(workers[0]):
            assert time.monotonic() < deadline, "the worker outlived rank 0"
            time.sleep(0.1)
    finally:
        for pid in [*reversed(_descendants(proc.pid)), *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.communicate(timeout=10)
