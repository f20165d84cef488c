"""`--load-format dummy`: an engine dir with no weights, whose ranks fill theirs with random
values on the device at load (quantized as built), for speed measurements of models that
do not fit the disk (Llama-3.1-70B / 405B)."""

from __future__ import annotations

import pytest
import torch

from kiln.build import build
from kiln.build.engine_dir import load_engine_config
from kiln.config import BuildConfig
from kiln.errors import BuildError, KilnError
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import SamplingParams
from tests.test_runtime import make_prompts, run_all

CFG = dict(dtype="float32", max_seq_len=128, max_batch_size=8, max_num_tokens=256,
           load_format="dummy")


@pytest.mark.parametrize("quant,kv,group,head", [
    ("none", "auto", 0, False), ("fp8", "fp8", 0, False), ("int8_wo", "auto", 0, False),
    ("int4_wo", "auto", 32, False), ("int4_wo", "auto", 32, True), ("fp8", "fp8", 0, True)],
    ids=["float", "fp8-kvfp8", "int8", "int4", "int4-head", "fp8-head"])
def test_dummy_engine_stores_nothing_and_generates(tiny_checkpoints, tmp_path, quant, kv,
                                                   group, head):
    folder, _ = tiny_checkpoints["llama3-rope-tied" if head else "llama"]
    out = build(folder, tmp_path / "e", BuildConfig(**CFG, quantization=quant,
                                                    kv_cache_dtype=kv, group_size=group,
                                                    quantize_lm_head="auto" if head else ""),
                progress=False)
    assert not list(out.glob("*.safetensors"))  # engine.json and the tokenizer only
    built = load_engine_config(out).build
    assert built.load_format == "dummy" and built.quantization == quant
    logits = []
    for _ in range(2):
        engine = LLMEngine(out, RuntimeConfig(device="cpu"))
        logits.append(engine.sequence_logits([5, 9, 2, 7, 11]))
        tokens = run_all(engine, make_prompts(3, seed=2),
                         SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        assert all(len(t) == 6 for t in tokens.values())
        engine.close()
    assert torch.isfinite(logits[0]).all()
    assert torch.equal(logits[0], logits[1])  # one seed: the same weights every load
    model = engine.runner.model
    layer = model.model.layers["0"]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(
        layer.input_layernorm.weight))
    if quant == "none":  # drawn as a random-weight checkpoint draws them
        std = layer.self_attn.qkv_proj.weight.std().item()
        assert 0.018 < std < 0.022, std
    else:
        assert layer.self_attn.qkv_proj.method.name == quant
    # the LM head: quantized apart from the (tied) float embedding only when asked
    assert (getattr(model.lm_head, "method", None) is not None
            and model.lm_head.method.name == quant) == head
    if head:  # tied in the checkpoint; the quantized head is its own
        assert model.lm_head.weight.dtype == (torch.uint8 if quant == "int4_wo" else
                                              torch.float8_e4m3fn)
        assert model.model.embed_tokens.weight.dtype == torch.float32


def test_dummy_tp2_engine_runs(tiny_checkpoints, tmp_path):
    """Each rank makes its own shard; replicated parameters agree (one seed)."""
    folder, _ = tiny_checkpoints["llama"]
    out = build(folder, tmp_path / "tp2", BuildConfig(**CFG, tp_size=2), progress=False)
    assert not list(out.glob("*.safetensors"))
    engine = LLMEngine(out, RuntimeConfig(device="cpu"))
    try:
        tokens = run_all(engine, make_prompts(4, seed=5),
                         SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    finally:
        engine.close()
    assert all(len(t) == 8 for t in tokens.values())


def test_dummy_refuses_what_needs_weights(tiny_checkpoints, tmp_path):
    folder, _ = tiny_checkpoints["llama"]
    for bad in (dict(quantization="int8_sq"), dict(calib_file="x.txt"),
                dict(kv_cache_dtype="int8")):
        with pytest.raises(BuildError, match="--load-format dummy stores no weights"):
            build(folder, tmp_path / "bad", BuildConfig(**CFG, **bad), progress=False)
    out = build(folder, tmp_path / "e", BuildConfig(**CFG), progress=False)
    from kiln.bench.hf_reference import hf_model_from_engine

    with pytest.raises(KilnError, match="stores no weights"):
        hf_model_from_engine(out)


def test_cli_build_and_bench_dummy(tmp_path, capsys):
    """`kiln build --random-weights --load-format dummy` and `kiln bench` on it."""
    from kiln.cli import main

    out = tmp_path / "smol"
    assert main(["build", "--random-weights", "--config", "smollm2-135m", "-o", str(out),
                 "--load-format", "dummy", "--max-seq-len", "128"]) in (0, None)
    assert not list(out.glob("*.safetensors"))
    assert main(["bench", "latency", str(out), "--input-len", "8", "--output-len", "4",
                 "--device", "cpu"]) in (0, None)
    assert "latency on cpu" in capsys.readouterr().out
    assert main(["bench", "latency", str(out), "--input-len", "8", "--output-len", "4",
                 "--device", "cpu", "--compare-hf"]) == 2
    assert "--compare-hf needs stored weights" in capsys.readouterr().err
