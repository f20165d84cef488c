"""GPT-NeoX without attention biases (attention_bias false in config.json): kiln reads the
flag as transformers does (the MLP keeps its biases) and matches it."""

from __future__ import annotations

import json

import torch

from kiln import LLM, SamplingParams
from kiln.eval import sequence_logits
from kiln.model_config import ModelConfig
from tests.conftest import make_hf_model

NEOX = dict(num_key_value_heads=None, hidden_act="gelu", rotary_pct=0.25)


def test_neox_without_attention_bias_matches_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    configs = {"neox": ("GPTNeoXConfig", dict(NEOX, attention_bias=False))}
    hf_model = make_hf_model("neox", tmp_path / "m", configs=configs)
    assert not any("query_key_value.bias" in n for n, _ in hf_model.named_parameters())
    cfg = ModelConfig.from_hf(json.loads((tmp_path / "m" / "config.json").read_text()))
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == (False, False, True)
    llm = LLM(tmp_path / "m", device="cpu")
    tokens = list(range(3, 90))
    with torch.no_grad():
        want = hf_model(torch.tensor([tokens])).logits[0]
    got = sequence_logits(llm.engine, tokens)
    assert (got - want).abs().max() < 1e-4
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    out = llm.generate([tokens[:9]], params)[0]
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([tokens[:9]]), max_new_tokens=8, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    assert out.token_ids == ref[0, 9:].tolist()


def test_neox_attention_bias_defaults_to_true():
    """A config.json without the key (older Pythia exports) keeps every bias."""
    hf = dict(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", hidden_size=64,
              num_attention_heads=4, num_hidden_layers=2, vocab_size=256,
              intermediate_size=128)
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == (True, True, True)
