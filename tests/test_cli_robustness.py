"""The command line and the build where a QA pass found them wanting, run as users run
them (the kiln command in a subprocess where signals, pipes or spawned ranks matter)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kiln.build import build
from kiln.cli import main
from kiln.config import BuildConfig
from tests.conftest import make_hf_model

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
KILN = [sys.executable, "-m", "kiln"]
CFG = dict(dtype="float32", max_seq_len=64, max_batch_size=4, max_num_tokens=64)


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    """A tiny Llama HF folder with no tokenizer files."""
    folder = tmp_path_factory.mktemp("robust") / "hf"
    make_hf_model("llama", folder)
    return folder


@pytest.fixture(scope="module")
def hf_with_tokenizer(hf, tmp_path_factory) -> Path:
    """The same weights with a word-level tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("robust-tok") / "hf"
    shutil.copytree(hf, folder)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 200)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---- output into a closed pipe (`kiln ... | head`) ----
@pytest.mark.parametrize("command", ["cache-list", "run"])
def test_output_into_a_closed_pipe_exits_quietly(command, hf_with_tokenizer, tmp_path):
    if command == "run":
        engine = build(hf_with_tokenizer, tmp_path / "e", BuildConfig(**CFG),
                       progress=False)
        args = ["run", str(engine), "--prompt", "w5 w6", "--max-tokens", "20", "--device",
                "cpu"]
    else:
        args = ["cache", "list"]
    proc = subprocess.Popen([*KILN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**ENV, "KILN_CACHE": str(tmp_path / "cache")})
    proc.stdout.close()  # the reader is gone before the first line
    stderr = proc.stderr.read()
    assert proc.wait(60) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


# ---- kiln bench names its own option ----
def test_kiln_bench_names_random_config(capsys):
    assert main(["bench", "latency", "--random-config", "bogus"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("kiln: error: unknown --random-config 'bogus'; presets: "
                           "llama-3.1-8b, "), line


# ---- interrupted builds ----
def _start_build(out: Path, cache: Path) -> tuple[subprocess.Popen, Path]:
    """A random-weight build (~3 s of work) into cache/engines, and its scratch dir
    once it exists."""
    before = set((cache / "engines").glob(".kiln-build-*"))
    proc = subprocess.Popen([*KILN, "build", "--random-weights", "--config", "smollm2-135m",
                             "--dtype", "float32", "-o", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**ENV, "KILN_CACHE": str(cache)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = set((cache / "engines").glob(".kiln-build-*")) - before
        if new:
            return proc, new.pop()
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    proc.kill()
    pytest.fail("the build made no scratch dir in 60 s")


def test_killed_builds_are_listed_and_cleared_but_not_one_in_progress(tmp_path, monkeypatch,
                                                                       capsys):
    cache = tmp_path / "cache"
    (cache / "engines").mkdir(parents=True)
    monkeypatch.setenv("KILN_CACHE", str(cache))
    running, in_progress = _start_build(cache / "engines" / "a", cache)
    try:
        running.send_signal(signal.SIGSTOP)  # holds its scratch dir, as a slow build does
        killed, leftover = _start_build(cache / "engines" / "b", cache)
        killed.kill()
        killed.wait(30)
        assert main(["cache", "list"]) == 0
        listed = capsys.readouterr().out.splitlines()
        assert len(listed) == 3, listed  # header, the leftover, the total
        assert listed[1].startswith(leftover.name) and "incomplete" in listed[1]
        assert listed[2].startswith("0 engine(s) and 1 incomplete build(s), ")
        assert main(["cache", "clear"]) == 0
        assert capsys.readouterr().out.startswith("removed 0 engine(s) and 1 incomplete "
                                                  "build(s), freed ")
        assert not leftover.exists() and in_progress.is_dir()
        # SIGTERM cleans up as Ctrl-C does (sent while stopped: it arrives on SIGCONT)
        running.send_signal(signal.SIGTERM)
        running.send_signal(signal.SIGCONT)
        assert running.wait(30) == 128 + signal.SIGTERM, running.stderr.read()
        assert "Traceback" not in running.stderr.read()
        assert not in_progress.exists() and not (cache / "engines" / "a").exists()
        assert main(["cache", "list"]) == 0
        assert capsys.readouterr().out.startswith("no cached engines")
    finally:
        running.kill()


def test_a_build_where_locks_are_unavailable_still_gets_a_scratch_dir(tmp_path, monkeypatch):
    """A filesystem without flock (ENOLCK): the build goes on unlocked (it looped making
    scratch dirs), and such a dir is never taken for a killed build's."""
    import errno
    import fcntl
    import threading

    from kiln.build import scratch

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    made = []
    thread = threading.Thread(target=lambda: made.append(scratch.make_scratch(tmp_path / "e")),
                              daemon=True)
    thread.start()
    thread.join(10)
    assert made, "make_scratch did not return"
    path, lock = made[0]
    assert path.is_dir() and lock is None
    assert len(list(tmp_path.glob(".kiln-build-*"))) == 1 and scratch.leftovers(tmp_path) == []


# ---- engines without a tokenizer ----
def test_engines_without_a_tokenizer_say_so_and_how_to_fix_it(hf, hf_with_tokenizer,
                                                               tmp_path):
    built = subprocess.run([*KILN, "build", str(hf), "-o", str(tmp_path / "notok"), "--dtype",
                            "float32", "--max-seq-len", "64"], capture_output=True, text=True,
                           env=ENV, timeout=120)
    assert built.returncode == 0, built.stderr
    assert (f"{hf} has no tokenizer files (tokenizer.json or tokenizer.model): the engine "
            "will take token ids only, not text prompts") in built.stderr
    run = subprocess.run([*KILN, "run", str(tmp_path / "notok"), "--prompt", "hi"],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 2
    assert _one_error_line(run.stderr) == (
        f"kiln: error: {tmp_path / 'notok'} has no tokenizer, so text cannot be encoded: its "
        f"source {hf} held no tokenizer files when it was built; add the model's "
        "tokenizer.json (or tokenizer.model) to it and build again")
    chat = subprocess.run([*KILN, "chat", str(tmp_path / "notok")], capture_output=True,
                          text=True, env=ENV, timeout=120, input="")
    assert chat.returncode == 2
    assert _one_error_line(chat.stderr) == _one_error_line(run.stderr)  # the same line

    engine = build(hf_with_tokenizer, tmp_path / "tok", BuildConfig(**CFG), progress=False)
    assert json.loads((engine / "engine.json").read_text())["source"]["has_tokenizer"]
    shutil.rmtree(engine / "tokenizer")
    run = subprocess.run([*KILN, "run", str(engine), "--prompt", "hi"], capture_output=True,
                         text=True, env=ENV, timeout=120)
    assert run.returncode == 2
    assert _one_error_line(run.stderr) == (
        f"kiln: error: {engine} is incomplete: its tokenizer/ folder is missing, so text "
        f"cannot be encoded; build the engine again: kiln build {hf_with_tokenizer} -o DIR")


# ---- kiln build: SOURCE with --random-weights, a build too large for the memory ----
def test_kiln_build_source_and_random_weights_conflict(hf, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["build", str(hf), "--random-weights", "--config", "smollm2-135m",
                 "-o", str(out)]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"kiln: error: SOURCE ({hf}) and --random-weights conflict: build either a "
        "checkpoint or random weights of a --config preset")
    assert not out.exists()


def test_a_build_larger_than_the_free_memory_is_refused_before_any_work(monkeypatch,
                                                                        tmp_path, capsys):
    import kiln.build.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 100_000_000)
    out = tmp_path / "engines" / "big"
    assert main(["build", "--random-weights", "--config", "smollm2-135m", "--dtype",
                 "float32", "-o", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("kiln: error: this build needs at least 0.5 GB of memory (the "
                           "model's weights in float32, held whole before they are "
                           "written) but 0.1 GB is available; free memory, or build with "
                           "a smaller --config, --dtype bfloat16"), line
    assert not (tmp_path / "engines").exists()  # not even a scratch dir


def test_the_memory_estimate_is_one_ranks_weights():
    import torch

    from kiln.build.memory import rank_bytes
    from kiln.checkpoint.random import RandomCheckpoint

    cfg = RandomCheckpoint("smollm2-135m").config
    one = rank_bytes(cfg, BuildConfig(), torch.float32, None, "auto")
    assert 134e6 * 4 < one < 136e6 * 4  # its parameters (tied head) and a rotary table
    assert rank_bytes(cfg, BuildConfig(), torch.bfloat16, None, "auto") < one * 0.51
    assert rank_bytes(cfg, BuildConfig(tp_size=3), torch.float32, None, "auto") < one * 0.4


# ---- a multi-rank engine from a script without the __main__ guard ----
def test_an_unguarded_script_loading_a_multi_rank_engine_fails_in_seconds(hf, tmp_path):
    """Each spawned rank imports the script again and so starts the engine again: it
    stops there, and rank 0 says why instead of waiting in the rendezvous."""
    engine = build(hf, tmp_path / "tp2", BuildConfig(**CFG, tp_size=2), progress=False)
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        from kiln import LLM
        llm = LLM({str(engine)!r}, device="cpu")
        print("loaded")
    """))
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=ENV, timeout=90)
    assert time.monotonic() - started < 60
    assert run.returncode == 1 and "loaded" not in run.stdout
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("kiln.distributed.launch.RankDied: worker rank 1 died as it "
                           "started"), run.stderr
    assert f"top level of {script}" in last and 'if __name__ == "__main__":' in last
    assert "bootstrapping phase" not in run.stderr and "leaked" not in run.stderr


def test_a_build_too_big_for_its_rotary_tables_names_max_seq_len():
    """A huge --max-seq-len makes the rotary table, not the weights, the build's memory:
    the error says so (it blamed the weights, and offered --dtype / --tp-size)."""
    import torch

    from kiln.build.memory import check_fits, rank_bytes
    from kiln.checkpoint.random import RandomCheckpoint
    from kiln.errors import BuildError

    cfg = RandomCheckpoint("smollm2-135m").config
    build_cfg = BuildConfig(max_seq_len=10_000_000)
    needed = rank_bytes(cfg, build_cfg, torch.bfloat16, None, "auto")
    assert needed.tables > 2e9 and needed - needed.tables < 0.3e9
    with pytest.raises(BuildError) as e:
        check_fits(needed, torch.bfloat16, build_cfg, "random:smollm2-135m", available=10**9)
    assert str(e.value) == (f"this build needs at least {needed / 1e9:.1f} GB of memory, "
                            f"{needed.tables / 1e9:.1f} GB of it the rotary tables for "
                            "--max-seq-len 10000000, but 1.0 GB is available; build with a "
                            "smaller --max-seq-len")
    small = rank_bytes(cfg, BuildConfig(), torch.bfloat16, None, "auto")
    with pytest.raises(BuildError, match="weights in bfloat16"):
        check_fits(small, torch.bfloat16, BuildConfig(), "random:smollm2-135m", available=1)
