"""Pre-quantized FP8 checkpoints as published (compressed-tensors from llm-compressor,
NVIDIA modelopt's HF export): kiln's logits against transformers on the same checkpoint
(for modelopt, which transformers cannot load, an emulation of its numerics), and a clear
error for schemes kiln cannot read."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from kiln import LLM
from kiln.build import build, load_engine_config
from kiln.config import BuildConfig
from kiln.errors import CheckpointError, KilnError
from kiln.eval import sequence_logits
from tests import quant_checkpoints as qc

needs_llmcompressor = pytest.mark.skipif(
    importlib.util.find_spec("llmcompressor") is None,
    reason="llmcompressor is not installed (make setup installs it)")
TOKENS = list(range(3, 120))


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    return qc.tiny_llama(tmp_path_factory.mktemp("float") / "llama")


def _fixture(kind: str, src, dest):
    if kind.startswith("ct-"):
        scheme, kv = {"ct-dynamic": ("FP8_DYNAMIC", False), "ct-static": ("FP8", False),
                      "ct-static-kv": ("FP8", True)}[kind]
        return qc.compressed_tensors_fp8(src, dest, scheme, kv_cache=kv)
    kv, style = {"modelopt": (False, "current"), "modelopt-kv": ("fp8", "current"),
                 "modelopt-kv-cast": ("fp8_cast", "current"),
                 "modelopt-legacy-kv": ("fp8_clamped", "legacy")}[kind]
    return qc.modelopt_fp8(src, dest, kv_cache=kv, config_style=style)


KINDS = {  # kind: (activation scheme, kv cache dtype kiln should pick)
    "ct-dynamic": ("dynamic", "auto"),
    "ct-static": ("static", "auto"),
    "ct-static-kv": ("static", "fp8"),
    "modelopt": ("static", "auto"),
    "modelopt-kv": ("static", "fp8"),
    "modelopt-kv-cast": ("static", "fp8"),
    "modelopt-legacy-kv": ("static", "fp8"),
}


@pytest.mark.parametrize("kind", [pytest.param(k, marks=needs_llmcompressor)
                                  if k.startswith("ct-") else k for k in KINDS])
def test_prequantized_fp8_matches_transformers(kind, float_folder, tmp_path):
    """Same checkpoint, same numerics: within rounding-flip noise (see
    test_quantization.test_quantized_engine_matches_its_simulation): mean |diff| below 10%
    of what the scheme moves the logits, max below half of it."""
    folder = _fixture(kind, float_folder, tmp_path / "ckpt")
    engine_dir = build(folder, tmp_path / "engine", BuildConfig(dtype="float32", max_seq_len=256),
                       progress=False)
    cfg = load_engine_config(engine_dir).build
    assert (cfg.quantization, cfg.activation_scheme, cfg.kv_cache_dtype) == \
        ("fp8", *KINDS[kind])
    assert cfg.quant_source == ("compressed-tensors" if kind.startswith("ct-") else "modelopt")
    got = sequence_logits(LLM(engine_dir, device="cpu").engine, TOKENS)
    want = qc.reference_logits(folder, torch.tensor([TOKENS])).reshape(len(TOKENS), -1)
    plain = qc.reference_logits(float_folder, torch.tensor([TOKENS])).reshape(len(TOKENS), -1)
    diff, scheme = (got - want).abs(), (want - plain).abs()
    assert scheme.max() > 0.05
    assert diff.mean() < 0.1 * scheme.mean() and diff.max() < 0.5 * scheme.max(), \
        (diff.mean().item(), scheme.mean().item(), diff.max().item(), scheme.max().item())


def _with_quant_config(float_folder, tmp_path, quantization_config: dict):
    folder = tmp_path / "ckpt"
    shutil.copytree(float_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("quantization_config, message", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True},
     "unsupported GPTQ checkpoint .*bits=4, group_size=128.*desc_act"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
     "unsupported AutoAWQ packing version='gemv'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quantized with 'bitsandbytes'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"type": "int", "num_bits": 4, "strategy": "group"}}}},
     "format=pack-quantized, weights int4/group"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8,
                                          "strategy": "channel"}}}},
     "FP8 weight-only is not supported"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "unsupported modelopt quant_algo"),
])
def test_unreadable_quantized_checkpoint_names_its_scheme(quantization_config, message,
                                                          float_folder, tmp_path):
    folder = _with_quant_config(float_folder, tmp_path, quantization_config)
    with pytest.raises(CheckpointError, match=message):
        build(folder, tmp_path / "e", BuildConfig(dtype="float32"), progress=False)
    assert not (tmp_path / "e").exists()


_CT_FP8 = {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
           "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                 "dynamic": True}, "targets": ["Linear"]}


@pytest.mark.parametrize("quantization_config, message", [
    ("fp8", r"config\.json's quantization_config is a string \('fp8'\); quantization tools "
     "write a JSON object there"),
    ([{"quant_method": "awq"}], "quantization_config is a list"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": [{"weights": {"num_bits": 8}}]},
     r"compressed-tensors config_groups \(group name -> scheme\) is a list"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"group_0": "fp8"}}, r"config_groups\['group_0'\] is a string"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"group_0": {"weights": "fp8", "targets": ["Linear"]}}},
     r"compressed-tensors weights scheme is a string \('fp8'\)"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"group_0": {**_CT_FP8, "input_activations": 8}}},
     "input_activations scheme is a number"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "kv_cache_scheme": "fp8",
      "config_groups": {"group_0": _CT_FP8}}, "kv_cache_scheme is a string"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": "lm_head",
      "config_groups": {"group_0": _CT_FP8}},
     "quantization_config ignore is 'lm_head'; expected a list of module names"),
    ({"quant_method": "modelopt", "quant_algo": "FP8", "exclude_modules": "lm_head"},
     "exclude_modules is 'lm_head'; expected a list"),
    ({"quant_algo": "FP8", "producer": "modelopt"}, "quantized with 'an unnamed method'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False},
     r"says gptq, but the checkpoint holds no packed weights \(\.qweight\)"),
])
def test_malformed_quantization_config_is_one_line(quantization_config, message,
                                                   float_folder, tmp_path):
    folder = _with_quant_config(float_folder, tmp_path, quantization_config)
    with pytest.raises(CheckpointError, match=message):
        build(folder, tmp_path / "e", BuildConfig(dtype="float32"), progress=False)


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", r"hf_quant_config\.json is a list \(\[1, 2\]\)"),
    ('{"quantization": "FP8"}', r"hf_quant_config\.json's \"quantization\" is a string"),
])
def test_malformed_hf_quant_config_is_one_line(content, message, float_folder, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(float_folder, folder)
    (folder / "hf_quant_config.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        build(folder, tmp_path / "e", BuildConfig(dtype="float32"), progress=False)


def test_prequantized_refuses_another_quantization(float_folder, tmp_path):
    folder = qc.modelopt_fp8(float_folder, tmp_path / "ckpt")
    with pytest.raises(KilnError, match="already quantized"):
        build(folder, tmp_path / "e", BuildConfig(dtype="float32", quantization="none"),
              progress=False)
