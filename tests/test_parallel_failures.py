"""Multi-rank engines whose ranks kiln spawned, when things go wrong: Ctrl-C in the middle
of a step, a worker killed or unable to load, runtime-option mistakes. Real gloo process
groups, real subprocesses and signals, each bounded by a timeout."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kiln.build import build
from kiln.config import BuildConfig
from kiln.errors import KilnError
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from tests.test_parallel_runtime import CFG, ENV, _children, _descendants
from tests.test_serve_support import tiny_chat_checkpoint


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    hf = tiny_chat_checkpoint()
    return {name: build(hf, root / name, BuildConfig(**CFG, tp_size=tp, pp_size=pp),
                        progress=False)
            for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("tp2pp2", 2, 2))}


# Generates without a pause once loaded (so a signal lands inside a step, in the middle
# of its collectives), after saying "ready" on stdout.
_LOOP = textwrap.dedent("""
    import sys
    from kiln import LLM, SamplingParams
    if __name__ == "__main__":
        llm = LLM(sys.argv[1], device="cpu")
        print("ready", flush=True)
        while True:
            llm.generate([1, 2, 3], SamplingParams(max_tokens=64, ignore_eos=True))
""")


def _start_loop(engine, tmp_path, **popen) -> tuple[subprocess.Popen, list[int]]:
    """The looping script on `engine`, once generating; with its worker processes."""
    script = tmp_path / "loop.py"
    script.write_text(_LOOP)
    # SIGINT as a terminal's foreground job has it: a shell's background job (a CI run
    # started with `&`) ignores it, and Python then installs no KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, str(script), str(engine)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **popen)
    assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=30)[1]
    workers = sorted(p for p in _children(proc.pid)  # spawned in rank order
                     if "spawn_main" in open(f"/proc/{p}/cmdline").read())
    time.sleep(0.5)  # well into generating
    return proc, workers


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _end(proc: subprocess.Popen, timeout: float) -> tuple[float, str]:
    """(seconds until proc exited, its stderr); killed with everything below it if it did
    not exit within `timeout`."""
    started = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in reversed(_descendants(proc.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, stderr = proc.communicate()
        pytest.fail(f"still running {timeout:.0f} s after the signal:\n{stderr[-3000:]}")
    return time.monotonic() - started, stderr


@pytest.mark.parametrize("layout", ["tp2", "tp2pp2"])
@pytest.mark.parametrize("group", [True, False], ids=["terminal", "rank0"])
def test_ctrl_c_in_a_step_exits_at_once_and_leaves_no_worker(engines, tmp_path, layout,
                                                             group):
    """Ctrl-C while rank 0 is inside a step: the workers may wait in that step's
    collectives, so closing the engine at exit neither tells them nor waits for them; it
    stops them. The script ends as an interrupted Python script does (SIGINT), within
    seconds, with no worker left. `terminal`: the signal reaches the whole process group,
    as a Ctrl-C in a terminal does (the workers ignore it: rank 0 stops them); `rank0`:
    only rank 0 gets it (kill -INT)."""
    proc, workers = _start_loop(engines[layout], tmp_path, start_new_session=True)
    assert workers
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    took, stderr = _end(proc, timeout=20)
    assert took < 8, took
    assert proc.returncode in (-signal.SIGINT, 130), stderr
    assert stderr.rstrip().endswith("KeyboardInterrupt"), stderr  # the script's own
    assert stderr.count("Traceback") == 1, stderr  # rank 0's: no worker's
    assert "leaked" not in stderr, stderr
    deadline = time.monotonic() + 5
    while any(map(_alive, workers)):
        assert time.monotonic() < deadline, "a worker outlived rank 0"
        time.sleep(0.1)


def test_the_killed_worker_is_named_and_the_others_stop_quietly(engines, tmp_path):
    """Four ranks (TP2 x PP2), the last one killed: its peers' collectives fail and they
    stop too, but quietly (no gloo traceback), and rank 0 names the rank that was killed,
    not the first of them in rank order; nothing follows its line (no resource tracker
    warning about the ring's semaphores)."""
    proc, workers = _start_loop(engines["tp2pp2"], tmp_path)
    assert len(workers) == 3
    os.kill(workers[-1], signal.SIGKILL)
    took, stderr = _end(proc, timeout=30)
    assert took < 10
    assert proc.returncode == 1, stderr
    assert stderr.strip() == "kiln: worker rank 3 died (killed by SIGKILL); the engine " \
                             "cannot continue", stderr


def test_a_worker_that_cannot_load_its_weights_is_one_line(engines, tmp_path):
    """A damaged rank1.safetensors: the worker stops on its KilnError, which rank 0 raises
    (one line, as a damaged rank0.safetensors gives), not the worker's traceback and rank
    0's "Connection closed by peer" from the next collective of the load."""
    damaged = tmp_path / "damaged"
    shutil.copytree(engines["tp2"], damaged)
    head = (damaged / "rank1.safetensors").read_bytes()[:1000]
    (damaged / "rank1.safetensors").write_bytes(head)
    run = subprocess.run([sys.executable, "-m", "kiln", "run", str(damaged), "--prompt", "Hi",
                          "--max-tokens", "2", "--device", "cpu"], capture_output=True,
                         text=True, timeout=120, env=ENV)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert lines[0].startswith("kiln: error: worker rank 1: ") and \
        "rank1.safetensors cannot be read" in lines[0], run.stderr
    # In this process: LLMEngine() raises it, the workers are gone and the process group
    # is freed, so another multi-rank engine loads.
    import torch.distributed as dist

    with pytest.raises(KilnError, match="worker rank 1: .*rank1.safetensors"):
        LLMEngine(damaged, RuntimeConfig(device="cpu"))
    assert not dist.is_initialized()
    assert not [p for p in _children(os.getpid())
                if _alive(p) and "spawn_main" in open(f"/proc/{p}/cmdline").read()]
    engine = LLMEngine(engines["tp2"], RuntimeConfig(device="cpu"))
    engine.close()


def test_runtime_mistakes_are_found_before_any_worker_starts(engines, monkeypatch):
    """Runtime options that the engine cannot take are one error before the workers are
    spawned (each worker found it again and printed its traceback); the attention-sinks
    one says how to fix it."""
    from kiln.distributed import launch

    def spawn(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(launch, "spawn", spawn)
    with pytest.raises(KilnError, match="max_seq_len 1024 exceeds the 256"):
        LLMEngine(engines["tp2pp2"], RuntimeConfig(device="cpu", max_seq_len=1024))
    with pytest.raises(KilnError, match="rebuild it with --pp-size 1"):
        LLMEngine(engines["pp2"], RuntimeConfig(device="cpu", attention_sinks=4,
                                                attention_window=64))
    with pytest.raises(KilnError, match="num_kv_blocks=2 cannot hold"):
        LLMEngine(engines["tp2"], RuntimeConfig(device="cpu", num_kv_blocks=2))


def test_closing_an_engine_puts_the_excepthook_back(engines):
    """init_process_group wraps sys.excepthook to prefix "[rank0]: "; each engine of a
    process added one more prefix to every later traceback line."""
    before = sys.excepthook
    for _ in range(2):
        engine = LLMEngine(engines["tp2"], RuntimeConfig(device="cpu"))
        assert sys.excepthook is not before  # the ranks' prefix while the engine runs
        engine.close()
        assert sys.excepthook is before


def test_a_worker_lost_in_a_served_step_is_logged_once(engines, caplog):
    """A server's engine (it keeps answering: 503) whose worker dies in the middle of a
    step: the watcher's line once, not again when the step fails, and no traceback of
    the step's KilnError (engine_loop logged it with log.exception)."""
    from kiln.runtime.request import SamplingParams
    from kiln.serve.engine_loop import EngineLoop, NewRequest

    class Sink:
        def __init__(self):
            self.outputs, self.errors = [], []

        def accepted(self):
            pass

        def output(self, output):
            self.outputs.append(output)

        def error(self, error):
            self.errors.append(error)

    engine = LLMEngine(engines["tp2"], RuntimeConfig(device="cpu"))
    engine.exit_on_failure = False
    loop, sink = EngineLoop(engine), Sink()
    loop.start()
    try:
        loop.add([NewRequest([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True),
                             "long")], sink)
        deadline = time.monotonic() + 30
        while len(sink.outputs) < 3:
            assert time.monotonic() < deadline and not sink.errors, sink.errors
            time.sleep(0.01)
        os.kill(engine.mirror.workers[0].pid, signal.SIGKILL)
        while not sink.errors:
            assert time.monotonic() < deadline + 10, "the step did not fail"
            time.sleep(0.05)
    finally:
        loop.shutdown()
        engine.close()
    assert "worker rank 1 died" in str(sink.errors[0])
    said = [r for r in caplog.records if "worker rank 1 died" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert not loop.alive
