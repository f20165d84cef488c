"""Shared by the serving tests (no tests here): a tiny random Llama with SmolLM2's real
tokenizer and chat template (so text, chat and streaming take the real paths, at tiny-
model speed), and a kiln server running an engine on a free port in a background thread.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tests.conftest import TINY, smollm2_gguf

MODEL = "tiny"  # the served model name in these tests


@functools.cache
def tiny_chat_engine() -> Path:
    """Built once per test process (a session fixture would be built per importing module)."""
    from kiln.build import build
    from kiln.config import BuildConfig

    hf = tiny_chat_checkpoint()
    cfg = BuildConfig(dtype="float32", max_batch_size=64, max_seq_len=256, max_num_tokens=2048)
    return build(hf, hf.parent / "engine", cfg, progress=False)


@functools.cache
def tiny_chat_checkpoint() -> Path:
    """A tiny random Llama HF folder with SmolLM2's tokenizer and chat template."""
    import gguf
    import transformers

    from kiln.checkpoint.gguf_tokenizer import write_gguf_tokenizer

    root = Path(tempfile.mkdtemp(prefix="kiln-serve-tests-"))
    atexit.register(shutil.rmtree, root, True)
    hf = root / "hf"
    hf.mkdir()
    write_gguf_tokenizer(gguf.GGUFReader(smollm2_gguf()), hf)
    config = transformers.LlamaConfig(**{**TINY, "vocab_size": 49152, "bos_token_id": 1,
                                         "eos_token_id": 2, "tie_word_embeddings": True})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(hf)
    return hf


@dataclass
class Served:
    url: str
    llm: Any  # kiln.serve.AsyncLLM

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@contextlib.contextmanager
def serve(engine_dir: Path | None = None, max_queue: int | None = None,
          engine_process: bool = False, **config: Any) -> Iterator[Served]:
    """`engine_process`: the engine runs in a child process (as `kiln serve` on a GPU)."""
    from kiln.runtime.engine import LLMEngine, RuntimeConfig
    from kiln.serve import AsyncLLM, ServerConfig, ServerThread, build_app

    if engine_process:
        llm = AsyncLLM.from_model(engine_dir or tiny_chat_engine(), max_queue=max_queue,
                                  engine_process=True, log_level="warning", device="cpu")
    else:
        engine = LLMEngine(engine_dir or tiny_chat_engine(), RuntimeConfig(device="cpu"))
        llm = AsyncLLM(engine, max_queue=max_queue)
    app = build_app(llm, ServerConfig(served_model_name=MODEL, **config))
    try:
        with ServerThread(app) as server:
            yield Served(server.url, llm)
    finally:
        llm.shutdown()


def start_kiln_serve(engine: Path | str, *args: str, env: dict | None = None,
                     timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """`kiln serve ENGINE` as a user starts it: a subprocess on a free loopback port,
    returned once /health answers 200 (with the server's URL)."""
    import httpx

    from kiln.distributed.launch import free_port

    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln", "serve", str(engine), "--port", url.rsplit(":", 1)[1],
         "--device", "cpu", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the server did not come up")
        time.sleep(0.2)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def metric(text: str, name: str, default: float | None = None) -> float:
    """The value of a sample (`name` with its labels, as printed) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    if default is None:
        raise KeyError(name)
    return default
