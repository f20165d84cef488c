"""The kiln command's choice of OpenMP waiting (kiln/cpu_wait.py): passive on a small
machine something else keeps busy, spinning (OpenMP's default) otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from kiln import cpu_wait
from kiln.cpu_wait import busy_cores, choose_openmp_wait

linux = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat")


@pytest.mark.parametrize("cpus, busy, environ, modules, want", [
    (2, 1.0, {}, {}, "PASSIVE"),             # one of two cores taken
    (8, 0.6, {}, {}, "PASSIVE"),
    (2, 0.2, {}, {}, None),                   # quiet enough
    (2, None, {}, {}, None),                  # cannot tell (not Linux)
    (64, 4.0, {}, {}, None),                  # a big machine leaves torch's threads cores
    (1, 1.0, {}, {}, None),                   # one CPU: one thread, nothing to wait for
    (2, 1.0, {"OMP_NUM_THREADS": "2"}, {}, None),  # the user chose
    (2, 1.0, {"OMP_WAIT_POLICY": "ACTIVE"}, {}, None),
    (2, 1.0, {"GOMP_SPINCOUNT": "1000"}, {}, None),
    (2, 1.0, {}, {"torch": object()}, None),  # too late: OpenMP has read its settings
])
def test_choice(cpus, busy, environ, modules, want, monkeypatch) -> None:
    # busy None: the load could not be measured (not Linux), not this machine's load now
    # (a busy CI machine made that case flaky)
    monkeypatch.setattr(cpu_wait, "busy_cores", lambda *a, **k: None)
    before = dict(environ)
    assert choose_openmp_wait(environ, modules, cpus, busy) == want
    if want is None:
        assert environ == before
    else:
        assert environ == {**before, "OMP_WAIT_POLICY": want}


@linux
def test_busy_cores_sees_a_busy_loop() -> None:
    """Measured, not assumed: a process spinning on one core shows as about one busy CPU
    (at least half of one) in the 50 ms window."""
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = busy_cores(window=0.2)
        assert busy is not None and 0.5 <= busy <= (os.cpu_count() or 1) + 0.01, busy
    finally:
        loop.kill()
        loop.wait()


def test_busy_cores_without_proc_stat(tmp_path) -> None:
    assert busy_cores(0.0, str(tmp_path / "missing")) is None
    still = tmp_path / "stat"
    still.write_text("cpu  10 0 10 100 0 0 0 0 0 0\n")  # no time passes in a copied file
    assert busy_cores(0.0, str(still)) is None


@linux
@pytest.mark.skipif(not 2 <= (os.cpu_count() or 1) <= 8, reason="chosen on 2-8 CPU machines")
def test_kiln_command_waits_passively_beside_a_busy_loop(tmp_path) -> None:
    """The kiln command itself, started while a loop holds a core, runs with passive
    OpenMP waiting (set before torch is imported); a user's own setting is kept."""
    env = {k: v for k, v in os.environ.items() if k not in
           ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env["KILN_CACHE"] = str(tmp_path)
    code = ("import os, sys, contextlib, io\n"
            "from kiln.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['cache', 'list'])\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\n")
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"])]
    try:
        time.sleep(0.3)
        got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120)
        assert got.returncode == 0, got.stderr[-2000:]
        assert got.stdout.split() == ["PASSIVE", "True"], got.stdout
        got = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY":
                                                                "ACTIVE"},
                             capture_output=True, text=True, timeout=120)
        assert got.stdout.split()[0] == "ACTIVE", got.stdout
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
