"""What a new user meets first: missing extras, the public API, the engine cache, the
terminal chat."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from kiln.extras import EXTRAS

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("module, extra", sorted(EXTRAS.items()))
def test_a_missing_extra_is_one_line_naming_it(module, extra, tmp_path):
    """The command fails with the extra to install, never a traceback: each optional
    package is blocked (None in sys.modules) before the CLI runs a command needing it."""
    commands = {
        "serve": ["serve", str(tmp_path / "no-engine")],
        "hf": ["bench", "latency", str(tmp_path / "no-engine"), "--compare-hf"],
    }
    if module == "httpx":  # the HTTP client of `kiln bench serving`
        commands["serve"] = ["bench", "serving", "--url", "http://127.0.0.1:9",
                             "--concurrency", "1", "--num-prompts", "1"]
    if extra not in commands:  # gpu / plot below; eval in tests/test_eval_*
        pytest.skip(f"the {extra} extra is checked by its own feature's tests")
    code = (f"import sys; sys.modules[{module!r}] = None; from kiln.cli import main; "
            f"sys.exit(main({commands[extra]!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env={**ENV, "KILN_CACHE": str(tmp_path)})
    if extra == "hf":  # the engine must exist before transformers is needed
        assert result.returncode == 2 and "does not exist" in result.stderr
        return
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"kiln: error: this needs the optional package "
                                     f"{module!r}, which is not installed: "
                                     f"pip install 'kiln[{extra}]'")


def test_compare_hf_without_transformers_names_the_extra(tiny_engines, monkeypatch, capsys):
    from kiln.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)
    code = main(["bench", "latency", str(tiny_engines["llama"]), "--compare-hf",
                 "--input-len", "8", "--output-len", "2", "--device", "cpu"])
    assert code == 2
    assert "pip install 'kiln[hf]'" in capsys.readouterr().err


def test_compare_hf_out_of_memory_keeps_kilns_result(tiny_engines, monkeypatch, capsys,
                                                     tmp_path):
    """transformers running out of memory (Mixtral's experts at 64 x 1000 tokens on an
    H200) is reported as such; kiln's numbers are printed and written all the same."""
    import json

    import torch

    from kiln.bench import hf_reference
    from kiln.cli import main

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.00 GiB.\nmore")

    monkeypatch.setattr(hf_reference, "run_hf", oom)
    out = tmp_path / "r.json"
    code = main(["bench", "throughput", str(tiny_engines["llama"]), "--compare-hf",
                 "--input-len", "8", "--output-len", "2", "--num-requests", "2",
                 "--device", "cpu", "--out", str(out)])
    assert code in (0, None)
    text = capsys.readouterr().out
    assert "transformers did not finish: out of memory at batch 2: CUDA out of memory. " \
        "Tried to allocate 14.00 GiB." in text
    result = json.loads(out.read_text())
    assert result["kiln"]["output_tok_s"] > 0 and "transformers" not in result
    assert result["load_phases"] == {}  # no warm-up or graphs on the CPU
    assert f"engine loaded in {result['engine_load_s']:.1f} s\n" in text
    assert result["transformers_error"].startswith("out of memory at batch 2")


def test_gpu_without_triton_and_plots_without_matplotlib(monkeypatch, tmp_path, capsys):
    import importlib.util

    from kiln import functional
    from kiln.bench import offline
    from kiln.errors import KilnError

    functional._require_triton.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(KilnError, match=r"pip install 'kiln\[gpu\]'"):
        functional._require_triton()
    functional._require_triton.cache_clear()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    offline._plot([], {}, tmp_path / "x.png")
    assert "pip install 'kiln[plot]'" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


def test_public_api_is_lazy_and_complete():
    code = ("import sys, kiln; assert 'torch' not in sys.modules; "
            "from kiln import LLM, SamplingParams, BeamSearchParams, RequestOutput, AsyncLLM; "
            "print(sorted(kiln.__all__))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "BeamSearchParams" in result.stdout and "AsyncLLM" in result.stdout
    import kiln

    with pytest.raises(AttributeError):
        kiln.NotAThing  # noqa: B018
    for argv in (["-m", "kiln", "--version"], ["-m", "kiln.cli", "--version"]):
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == f"kiln {kiln.__version__}"


def test_runtime_limits_reuse_one_cached_engine(tiny_checkpoints, tmp_path, monkeypatch,
                                                capsys):
    """Batch size and token budget are runtime settings; a longer max_seq_len rebuilds the
    one cache entry; `kiln cache list | clear` show and free it."""
    from kiln import LLM
    from kiln.cli import main

    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    folder, _ = tiny_checkpoints["llama"]
    first = LLM(folder, dtype="float32", device="cpu", max_seq_len=128)
    second = LLM(folder, dtype="float32", device="cpu", max_batch_size=3, max_num_tokens=64,
                 max_seq_len=96)
    assert second.engine_dir == first.engine_dir
    assert (second.engine.max_batch_size, second.engine.max_seq_len) == (3, 96)
    assert second.engine.scheduler.max_num_tokens == 64
    capsys.readouterr()
    longer = LLM(folder, dtype="float32", device="cpu", max_seq_len=200)
    assert longer.engine_dir == first.engine_dir and longer.engine.max_seq_len == 200
    said = capsys.readouterr().out
    assert "again: it was built for 128 tokens, 200 asked\n" in said, said
    # past what a run naming no length plans (the model's 512 positions): the shared entry
    # changes what every later run gets, and the rebuild says so
    assert LLM(folder, dtype="float32", device="cpu", max_seq_len=1024).engine.max_seq_len \
        == 1024
    said = capsys.readouterr().out
    assert "again: it was built for 200 tokens, 1024 asked; runs that name no --max-seq-len" \
        " will then take 1024" in said, said
    assert LLM(folder, dtype="float32", device="cpu").engine.max_seq_len == 1024
    assert "building" not in capsys.readouterr().out
    assert len(list((tmp_path / "engines").iterdir())) == 1
    assert main(["cache", "list"]) == 0
    listing = capsys.readouterr().out
    assert first.engine_dir.name in listing and "1 engine(s)" in listing and " KB" in listing
    assert main(["cache", "clear", "nope"]) == 2
    assert main(["cache", "clear"]) == 0
    assert "removed 1 engine(s)" in capsys.readouterr().out
    assert not any((tmp_path / "engines").iterdir())


class Terminal:
    """A child process on a pseudo-terminal, read until expected text shows up."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execve(sys.executable, [sys.executable, *argv], ENV)
        self.seen = ""

    def expect(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            assert time.monotonic() < deadline, f"no {text!r} in {self.seen[-500:]!r}"
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    break
        assert text in self.seen, self.seen[-500:]
        before, _, self.seen = self.seen.partition(text)
        return before

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                os.read(self.fd, 4096)
            except OSError:
                pass
            time.sleep(0.1)
        os.kill(self.pid, 9)
        raise AssertionError("the chat did not exit")


def test_kiln_chat_in_a_terminal(smollm2_engine):
    term = Terminal(["-m", "kiln", "chat", str(smollm2_engine), "--device", "cpu",
                     "--temperature", "0", "--max-tokens", "400"])
    term.expect("you> ")
    term.send("What is the capital of France? Answer in one word.\r")
    first = term.expect("you> ")
    assert "Paris" in first
    term.send("And of Italy?\r")  # the history is kept: "And of Italy?" is answerable
    assert "Rome" in term.expect("you> ")
    term.send("/reset\r")
    term.expect("(conversation cleared)")
    term.send("Write a very long story about a dragon.\r")
    time.sleep(2.0)  # some tokens out, far from 400
    term.send("\x03")  # Ctrl-C: stops this answer, not the chat
    term.expect("[stopped]")
    term.expect("you> ")
    term.send("/exit\r")
    assert term.wait() == 0
