"""Checkpoint QA findings (63rd session): partial_rotary_factor on families whose
transformers class ignores it, head counts and rotary parts no model can run, token ids
that are not ids, and damaged HF folders that raised tracebacks instead of one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kiln import LLM
from kiln.build import build
from kiln.build.builder import validate
from kiln.checkpoint import open_checkpoint
from kiln.cli import main
from kiln.config import BuildConfig, ModelConfig
from kiln.errors import BuildError, CheckpointError
from kiln.eval import sequence_logits
from tests.conftest import make_hf_model

F32 = BuildConfig(dtype="float32", max_seq_len=64)
TOKENS = list(range(3, 60))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qa63") / "llama"
    make_hf_model("llama", folder)
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "hf"
    shutil.copytree(folder, dest)
    return dest


def _edit_config(folder: Path, **change) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))


@pytest.mark.parametrize("arch, cls, extra", [
    ("llama", "LlamaConfig", {}),
    ("qwen3", "Qwen3Config", dict(head_dim=32)),
])
def test_partial_rotary_factor_is_ignored_where_transformers_ignores_it(arch, cls, extra,
                                                                        tmp_path):
    """transformers' Llama-style classes rotate the whole head whatever
    partial_rotary_factor says (their default rope ignores it; only Phi-3, Phi-2 and
    GPT-NeoX apply it): kiln rotated half of each head, logits off by ~3."""
    model = make_hf_model(arch, tmp_path / "hf", configs={
        arch: (cls, dict(extra, partial_rotary_factor=0.5))})
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"][
        "partial_rotary_factor"] == 0.5
    with torch.no_grad():
        want = model(torch.tensor([TOKENS])).logits[0]
    engine = build(tmp_path / "hf", tmp_path / "e", F32, progress=False)
    got = sequence_logits(LLM(engine, device="cpu").engine, TOKENS)
    assert (got - want).abs().max() < 1e-4


def test_partial_rotary_factor_still_applies_to_phi3(tmp_path):
    model = make_hf_model("phi3", tmp_path / "hf", configs={"phi3": ("Phi3Config", dict(
        partial_rotary_factor=0.5, pad_token_id=0, sliding_window=None))})
    assert open_checkpoint(tmp_path / "hf").config.rotary_dim == 8
    with torch.no_grad():
        want = model(torch.tensor([TOKENS])).logits[0]
    engine = build(tmp_path / "hf", tmp_path / "e", F32, progress=False)
    assert (sequence_logits(LLM(engine, device="cpu").engine, TOKENS) - want).abs().max() < 1e-4


LLAMA_HF = dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=96,
                intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2)
PHI_HF = dict(architectures=["PhiForCausalLM"], vocab_size=256, hidden_size=256,
              intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize("hf, words", [
    # The engine built, then attention raised a traceback at the first prompt.
    (dict(LLAMA_HF, num_key_value_heads=4), "6 attention heads are not a multiple of its 4 KV"),
    (dict(LLAMA_HF, num_key_value_heads=12), "6 attention heads are not a multiple of its 12"),
    # Phi-2's 64-dim heads: 0.3 rotates 19 dims (transformers fails on an odd count), 1.5
    # more dims than the head has (kiln's rotary raised at the first prompt).
    (dict(PHI_HF, partial_rotary_factor=0.3), "rotates 19 dims; it must rotate an even"),
    (dict(PHI_HF, partial_rotary_factor=1.5), "rotates 96 dims"),
    (dict(PHI_HF, partial_rotary_factor=0.0), "rotates 0 dims"),
    # NaN rotary tables: every logit NaN.
    (dict(LLAMA_HF, rope_theta=0), "rope_theta 0.0 must be a positive number"),
    (dict(LLAMA_HF, rope_theta=-10000.0), "rope_theta -10000.0 must be a positive number"),
    # Run as global attention (transformers refuses a kind it does not know).
    (dict(LLAMA_HF, layer_types=["chunked_attention", "full_attention"]),
     "layer_types lists 'chunked_attention'; kiln runs 'sliding_attention' and"),
])
def test_shapes_no_model_runs_fail_before_the_build(hf, words):
    with pytest.raises(BuildError, match=words):
        validate(ModelConfig.from_hf(hf), BuildConfig())


@pytest.mark.parametrize("where, field, value", [
    ("config.json", "eos_token_id", "2"),
    ("config.json", "eos_token_id", ["</s>"]),
    ("config.json", "bos_token_id", "<s>"),
    ("config.json", "eos_token_id", 2.5),
    ("generation_config.json", "eos_token_id", "x"),
    ("generation_config.json", "eos_token_id", [2, "<|eot_id|>"]),
])
def test_token_ids_that_are_not_ids_are_named(where, field, value, llama, tmp_path):
    """A token's text where config.json / generation_config.json wants its id went into the
    engine's EOS ids as a string: min_tokens then raised a TypeError mid-generation."""
    folder = _copy(llama, tmp_path)
    path = folder / where
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(CheckpointError, match=rf"^{where} field '{field}' is .*; it must be "
                                              "a token id"):
        open_checkpoint(folder)


def test_token_id_lists_and_nulls_still_read(llama, tmp_path):
    folder = _copy(llama, tmp_path)
    _edit_config(folder, eos_token_id=[2, 7], bos_token_id=None)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9, -1]}))
    cfg = open_checkpoint(folder).config
    assert cfg.eos_token_ids == (2, 7, 9) and cfg.bos_token_id is None
    _edit_config(folder, eos_token_id=-1, bos_token_id=[1])  # (-1: none, as some write it)
    cfg = open_checkpoint(folder).config
    assert cfg.eos_token_ids == (7, 9) and cfg.bos_token_id == 1


def _header(folder: Path, header) -> None:
    data = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(data).to_bytes(8, "little") + data)


def _dir_for_weights(folder: Path) -> None:
    shutil.move(folder / "model.safetensors", folder / "model-00001-of-00001.bin")
    (folder / "model.safetensors").mkdir()  # and so no weights transformers would read


DAMAGED = {
    "header not an object": (lambda f: _header(f, [1, 2]),
                             "model.safetensors is truncated or corrupt: its header is not"),
    "entry without offsets": (lambda f: _header(f, {"w": {"dtype": "F32", "shape": [1]}}),
                              "model.safetensors is corrupt: its header holds an entry "
                              "without data_offsets"),
    "entry not an object": (lambda f: _header(f, {"w": "F32"}), "without data_offsets"),
    "config not UTF-8": (lambda f: (f / "config.json").write_bytes(b"\xff\xfe{}"),
                         "config.json is not valid JSON: 'utf-8' codec"),
    "generation config an array": (
        lambda f: (f / "generation_config.json").write_text("[2]"),
        "generation_config.json is not a JSON object of generation settings"),
    "weights a directory": (_dir_for_weights, "has no weights: expected model.safetensors"),
    "garbage bin": (lambda f: ((f / "model.safetensors").unlink(),
                               (f / "pytorch_model.bin").write_bytes(b"not a pickle")),
                    "pytorch_model.bin could not be loaded: UnpicklingError: .*; kiln reads "
                    "tensors only"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_folders_are_one_line(case, llama, tmp_path, capsys):
    """Each raised a traceback (AttributeError, KeyError, TypeError, UnicodeDecodeError,
    IsADirectoryError), or, for a .bin torch.load refuses, torch's ten-line advice to
    re-run torch.load with weights_only=False."""
    damage, words = DAMAGED[case]
    folder = _copy(llama, tmp_path)
    damage(folder)
    with pytest.raises(CheckpointError, match=words) as err:
        build(folder, tmp_path / "e", F32, progress=False)
    assert "\n" not in str(err.value)
    assert main(["build", str(folder), "-o", str(tmp_path / "e2"), "--dtype", "float32"]) == 2
    err_text = capsys.readouterr().err
    assert "Traceback" not in err_text
    assert [line for line in err_text.splitlines() if line.startswith("kiln: error:")]
