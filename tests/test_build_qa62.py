"""Build QA findings (62nd session): tied LM heads as checkpoints other than
save_pretrained's hold them, config.json's layer_types / sliding_window of the wrong
shape, and a rebuild stopped while it swaps the old engine for the new one."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln import LLM
from kiln.build import build
from kiln.build import scratch as scratches
from kiln.build.engine_dir import is_engine_dir, load_engine_config
from kiln.cli import main
from kiln.config import BuildConfig
from kiln.eval import sequence_logits
from tests.conftest import make_hf_model

F32 = BuildConfig(dtype="float32", max_seq_len=64)
TOKENS = list(range(3, 60))
TIED = {"qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
        "gpt2": ("GPT2Config", dict(n_inner=128, num_key_value_heads=None))}


def _logits_gap(folder: Path, engine: Path) -> float:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([TOKENS])).logits[0]
    return (sequence_logits(LLM(engine, device="cpu").engine, TOKENS) - want).abs().max().item()


@pytest.mark.parametrize("arch", TIED)
def test_tied_checkpoint_holding_only_the_head(arch, tmp_path):
    """safetensors' save_model keeps one name of tied tensors, the first in sorted order:
    lm_head.weight, not the embedding's (GPT-2: transformer.wte.weight). transformers loads
    the embedding from it; kiln said the checkpoint was missing the embedding."""
    import safetensors.torch

    model = make_hf_model(arch, tmp_path / "hf", configs=TIED)
    folder = tmp_path / "saved"
    folder.mkdir()
    model.config.save_pretrained(folder)
    safetensors.torch.save_model(model, str(folder / "model.safetensors"))
    names = set(load_file(folder / "model.safetensors"))
    assert "lm_head.weight" in names and not any("embed_tokens" in n or "wte" in n for n in names)
    engine = build(folder, tmp_path / "e", F32, progress=False)
    assert _logits_gap(folder, engine) < 1e-4


def test_tied_config_with_a_different_head_is_untied_as_transformers(tmp_path, caplog):
    """A config that ties the head to the embedding over a checkpoint holding both with
    different values: transformers (5) keeps them apart; kiln tied them (logits off by
    several units) and now unties them too, saying so."""
    folder = tmp_path / "hf"
    make_hf_model("qwen2", folder, configs=TIED)
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"] * -2
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        engine = build(folder, tmp_path / "e", F32, progress=False)
    assert "tie_word_embeddings" in caplog.text
    assert not load_engine_config(engine).model.tie_word_embeddings
    assert _logits_gap(folder, engine) < 1e-4


@pytest.mark.parametrize("change, words", [
    (dict(layer_types=["sliding_attention"]), "'layer_types' lists 1 layer type(s)"),
    (dict(sliding_window="16"), "'sliding_window' is \"16\""),
])
def test_layer_types_and_window_of_the_wrong_shape_are_one_line(change, words, tmp_path,
                                                                  capsys):
    """Layers pruned by editing num_hidden_layers leave layer_types one entry a layer too
    long or short (transformers refuses it); kiln raised IndexError / TypeError."""
    folder = tmp_path / "hf"
    make_hf_model("gemma2", folder, configs={"gemma2": ("Gemma2Config", dict(head_dim=16))})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    capsys.readouterr()
    assert main(["build", str(folder), "-o", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and err.startswith("kiln: error: config.json") and "\n" not in err


def test_a_rebuild_stopped_while_swapping_leaves_the_old_engine_whole(tmp_path, monkeypatch):
    """The finished engine replaced the old one by removing the old dir, then renaming the
    new one there: a Ctrl-C inside that removal left an engine.json whose weights or
    tokenizer were gone. Now the old engine is renamed aside first."""
    folder = tmp_path / "hf"
    make_hf_model("qwen2", folder, configs=TIED)
    out = build(folder, tmp_path / "e", F32, progress=False)
    before = sorted(p.name for p in out.iterdir())
    removing, stops = shutil.rmtree, []

    def interrupted(path, *args, **kwargs):  # the old engine's removal, cut short once
        if not stops and is_engine_dir(Path(path)) and Path(path).name != "tokenizer":
            stops.append(path)
            (Path(path) / "rank0.safetensors").unlink()
            raise KeyboardInterrupt
        return removing(path, *args, **kwargs)

    monkeypatch.setattr(scratches.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(folder, out, F32, progress=False)
    monkeypatch.setattr(scratches.shutil, "rmtree", removing)
    assert stops and is_engine_dir(out) and sorted(p.name for p in out.iterdir()) == before
    load_engine_config(out)  # every rank file there
