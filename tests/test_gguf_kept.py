"""GGUF files kept quantized (kiln/build/gguf_blocks.py): block decoding against the gguf
package's dequantization (llama.cpp's formulas in numpy), and engines that keep the
blocks against engines that dequantize the same file: bit-identical logits on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kiln import LLM
from kiln.build import build, load_engine_config
from kiln.build.gguf_blocks import KEPT_TYPES, decode_blocks, layer_spec, to_storage
from kiln.build.quantize import plan_quantization
from kiln.checkpoint.gguf import GGUFCheckpoint
from kiln.checkpoint.random_gguf import random_blocks
from kiln.config import BuildConfig
from kiln.errors import BuildError
from kiln.eval import sequence_logits
from kiln.kernels import cpu_int
from kiln.kernels.reference import dequantize_int_weight
from tests.conftest import smollm2_gguf
from tests.test_gguf import (
    FFN,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    _gguf_name,
    _hf_state,
    _llama_cpp_permute,
)

Q = gguf.GGMLQuantizationType
TOKENS = list(range(3, 100))


@pytest.mark.parametrize("qtype", list(KEPT_TYPES), ids=lambda q: q.name)
def test_kept_blocks_dequantize_to_llama_cpp_values_bit_for_bit(qtype):
    rows, cols = 6, 512
    data = random_blocks(qtype, rows, cols)
    want = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(rows, cols).copy())
    q, scale, offset = decode_blocks(qtype, data, rows, cols)
    bits, group, has_offset = KEPT_TYPES[qtype]
    assert scale.shape == (rows, cols // group) and (offset is not None) == has_offset
    # in the layer's own storage, and in a wider one (int8, groups of 16, offsets) that a
    # fused layer mixing types takes
    for spec in (layer_spec([qtype]), "int8_g16_offset"):
        stored = to_storage(q, scale, offset, spec)
        if spec.startswith("int4"):
            assert stored["weight"].dtype == torch.uint8 and stored["weight"].shape == (
                rows, cols // 2)
        got = dequantize_int_weight(stored["weight"], stored["weight_scale"],
                                    stored.get("weight_offset"))
        assert torch.equal(got, want), (spec, (got - want).abs().max())


def test_layer_spec_holds_every_part():
    assert layer_spec([Q.Q4_1, Q.Q4_1, Q.Q4_1]) == "int4_g32_offset"
    assert layer_spec([Q.Q8_0]) == "int8_g32"
    assert layer_spec([Q.Q4_K, Q.Q4_K, Q.Q6_K]) == "int8_g16_offset"  # Q4_K_M's qkv
    assert layer_spec([Q.Q5_0, Q.Q8_0]) == "int8_g32"
    assert layer_spec([Q.Q4_0, Q.F16]) == "none"  # a float part: the layer stays float
    assert layer_spec([Q.Q3_K]) == "none"


# ---- engines: kept vs dequantized ----------------------------------------------------
def _logits(engine_dir: Path) -> torch.Tensor:
    return sequence_logits(LLM(engine_dir, device="cpu").engine, TOKENS)


def test_smollm2_q4_1_kept_engine_is_bit_identical(tmp_path, smollm2_engine, monkeypatch):
    kept = build(smollm2_gguf(), tmp_path / "kept", BuildConfig(
        dtype="float32", max_seq_len=256, quantization="gguf"), progress=False)
    plain = smollm2_engine
    if load_engine_config(plain).build.quantization != "none":  # auto keeps on CUDA and
        plain = build(smollm2_gguf(), tmp_path / "plain", BuildConfig(  # kiln's CPU kernel
            dtype="float32", max_seq_len=256, quantization="none"), progress=False)
    cfg = load_engine_config(kept).build
    assert (cfg.quantization, cfg.quant_source, cfg.quantize_lm_head) == ("gguf", "gguf", "gguf")
    # the Q4_1 linears, and the Q8_0 embedding kept a second time as the tied LM head
    assert cfg.quant_layers.pop("lm_head") == "int8_g32"
    assert set(cfg.quant_layers.values()) == {"int4_g32_offset"}
    assert len(cfg.quant_layers) == 30 * 4
    state = load_file(str(kept / "rank0.safetensors"))
    assert state["model.layers.0.self_attn.qkv_proj.weight"].shape == (576 + 2 * 192, 288)
    assert state["model.layers.0.self_attn.qkv_proj.weight"].dtype == torch.uint8
    assert state["lm_head.weight"].dtype == torch.int8
    assert state["lm_head.weight_scale"].shape == (49152, 576 // 32)
    assert "model.embed_tokens.weight" not in state  # tied: the embedding reads the head
    rows = TOKENS[:cpu_int.MAX_ROWS]  # a step kiln.kernels.cpu_int takes, where it runs
    kernel = sequence_logits(LLM(kept, device="cpu").engine, rows)
    monkeypatch.setattr(cpu_int, "_library", None)  # the reference: dequantized weights
    monkeypatch.setattr(cpu_int, "_tried", True)
    assert torch.equal(_logits(kept), _logits(plain))  # the values llama.cpp dequantizes
    reference = sequence_logits(LLM(kept, device="cpu").engine, rows)
    # float32 sums in another order, by both sides (the kernel's and torch's differ with
    # the CPU's instruction set): at most 1.5e-3 on an AVX-512 CPU, 5.5e-3 on an AVX2-only
    # AMD EPYC (60th session; mean 9.8e-5), logits up to 36, where the dequantized engine
    # and transformers differ by 8.8e-3; a wrong weight, scale or offset is off by ~1 or more
    torch.testing.assert_close(kernel, reference, rtol=0, atol=1e-2)
    assert (kernel - reference).abs().mean() < 5e-4
    assert torch.equal(kernel.argmax(-1), reference.argmax(-1))
    size = sum(f.stat().st_size for f in kept.iterdir() if f.is_file())
    assert size < 0.25 * sum(f.stat().st_size for f in plain.iterdir() if f.is_file())


MIXED = {  # HF projection -> GGUF type, as Q4_K_M-style files mix them
    "self_attn.q_proj": Q.Q4_K, "self_attn.k_proj": Q.Q4_K, "self_attn.v_proj": Q.Q6_K,
    "self_attn.o_proj": Q.Q4_0, "mlp.gate_proj": Q.Q5_0, "mlp.up_proj": Q.Q8_0,
    "mlp.down_proj": Q.Q5_K,
}


def _write_mixed(path: Path, layer1_down: Q = Q.F16, head: Q | None = None,
                 tied: bool = False) -> None:
    """A tiny llama GGUF, one type per projection (MIXED); layer 1's down_proj in
    `layer1_down`; output.weight in `head` (float if None), or, tied, no output.weight
    and token_embd in `head`; random blocks with finite scales."""
    state = _hf_state("llama")
    if tied:
        del state["lm_head.weight"]
    w = gguf.GGUFWriter(path, "llama")
    for add, value in ((w.add_block_count, LAYERS), (w.add_context_length, 2048),
                       (w.add_embedding_length, HIDDEN), (w.add_feed_forward_length, FFN),
                       (w.add_head_count, HEADS), (w.add_head_count_kv, KV_HEADS),
                       (w.add_layer_norm_rms_eps, 1e-6), (w.add_rope_freq_base, 10000.0)):
        add(value)
    for seed, (name, x) in enumerate(state.items()):
        qtype = next((t for p, t in MIXED.items() if f".{p}." in name), None)
        if name == "model.layers.1.mlp.down_proj.weight":
            qtype = layer1_down
        if name == ("model.embed_tokens.weight" if tied else "lm_head.weight"):
            qtype = head
        if qtype is None or x.ndim == 1:
            w.add_tensor(_gguf_name(name), x)
        elif qtype == Q.F16:
            w.add_tensor(_gguf_name(name), x.astype(np.float16))
        else:
            if ".q_proj." in name or ".k_proj." in name:
                x = _llama_cpp_permute(x, HEADS if ".q_proj." in name else KV_HEADS)
            w.add_tensor(_gguf_name(name), random_blocks(qtype, *x.shape, seed=seed),
                         raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_mixed_types_kept_engine_is_bit_identical(tmp_path):
    path = tmp_path / "mixed.gguf"
    _write_mixed(path)
    opts = dict(dtype="float32", max_seq_len=256)
    kept = build(path, tmp_path / "kept", BuildConfig(quantization="gguf", **opts),
                 progress=False)
    plain = build(path, tmp_path / "plain", BuildConfig(quantization="none", **opts),
                  progress=False)
    layers = load_engine_config(kept).build.quant_layers
    assert layers == {
        "model.layers.0.self_attn.qkv_proj": "int8_g16_offset",
        "model.layers.0.self_attn.o_proj": "int4_g32_offset",
        "model.layers.0.mlp.gate_up_proj": "int8_g32",
        "model.layers.0.mlp.down_proj": "int8_g32_offset",
        "model.layers.1.self_attn.qkv_proj": "int8_g16_offset",
        "model.layers.1.self_attn.o_proj": "int4_g32_offset",
        "model.layers.1.mlp.gate_up_proj": "int8_g32",
        "model.layers.1.mlp.down_proj": "none",  # F16 stays float
    }
    state = load_file(str(kept / "rank0.safetensors"))
    assert state["model.layers.1.mlp.down_proj.weight"].dtype == torch.float32
    assert state["model.layers.0.self_attn.o_proj.weight"].dtype == torch.uint8
    got, want = _logits(kept), _logits(plain)
    assert torch.isfinite(want).all() and want.std() > 0
    assert torch.equal(got, want)


@pytest.mark.parametrize("head, tied", [(Q.Q6_K, False), (Q.Q8_0, True), (Q.Q4_0, True)],
                         ids=["Q6_K-output", "Q8_0-tied", "Q4_0-tied"])
def test_quantized_lm_head_is_kept(tmp_path, monkeypatch, head, tied):
    """output.weight (or the token_embd a head is tied to) in a kept type: the head keeps
    its blocks (a tied embedding is not stored again: it looks its rows up in the head's
    blocks); the same logits as a dequantized engine, and through kiln's CPU kernel close
    to them."""
    path = tmp_path / "head.gguf"
    _write_mixed(path, head=head, tied=tied)
    opts = dict(dtype="float32", max_seq_len=256)
    kept = build(path, tmp_path / "kept", BuildConfig(quantization="gguf", **opts),
                 progress=False)
    plain = build(path, tmp_path / "plain", BuildConfig(quantization="none", **opts),
                  progress=False)
    built = load_engine_config(kept)
    assert built.model.tie_word_embeddings == tied
    assert built.build.quant_layers["lm_head"] == layer_spec([head])
    assert built.build.quantize_lm_head == "gguf"
    state = load_file(str(kept / "rank0.safetensors"))
    assert state["lm_head.weight"].dtype == (torch.uint8 if head == Q.Q4_0 else torch.int8)
    if tied:
        assert "model.embed_tokens.weight" not in state
    else:
        assert state["model.embed_tokens.weight"].dtype == torch.float32
    rows = TOKENS[:cpu_int.MAX_ROWS]
    kernel = sequence_logits(LLM(kept, device="cpu").engine, rows)
    monkeypatch.setattr(cpu_int, "_library", None)
    monkeypatch.setattr(cpu_int, "_tried", True)
    want = sequence_logits(LLM(plain, device="cpu").engine, rows)
    assert torch.isfinite(want).all() and want.std() > 0
    assert torch.equal(sequence_logits(LLM(kept, device="cpu").engine, rows), want)
    # each layer's kernel sums are closer to float64 than float32 GEMM's (test_cpu_int);
    # two random layers amplify either order's rounding to ~2e-4 of the largest logit
    torch.testing.assert_close(kernel, want, rtol=0, atol=5e-4 * want.abs().max().item())


def test_default_keeps_blocks_where_kernels_read_them(tmp_path, monkeypatch, caplog):
    path = tmp_path / "mixed.gguf"
    _write_mixed(path, head=Q.Q8_0)
    ckpt = GGUFCheckpoint(path)
    monkeypatch.setattr(cpu_int, "available", lambda: False)  # a CPU without the kernel
    assert plan_quantization(ckpt, BuildConfig()).quant.method == "none"
    monkeypatch.setattr(cpu_int, "available", lambda: True)  # with it: float32 engines keep
    plan = plan_quantization(ckpt, BuildConfig())  # the layers and the head
    assert (plan.quant.method, plan.quant.lm_head) == ("gguf", "gguf")
    assert dict(plan.quant.layers)["lm_head"] == "int8_g32"
    assert plan_quantization(ckpt, BuildConfig(dtype="bfloat16")).quant.method == "none"
    monkeypatch.setattr(cpu_int, "available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="kiln.build.quantize"):
        plan = plan_quantization(ckpt, BuildConfig())  # CUDA: the layers; the head stays
    assert (plan.quant.method, plan.source, plan.quant.lm_head) == ("gguf", "gguf", "")
    assert "lm_head" not in dict(plan.quant.layers)  # float (47th session: int8 g32 loses
    # to bf16 from 8 rows), and the build says what kept blocks cost under load
    assert "slower than bf16 at ~64 concurrent requests" in caplog.text
    assert "--quantization none" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="kiln.build.quantize"):
        plan_quantization(ckpt, BuildConfig(quantization="gguf"))  # asked for: no notice
    assert "concurrent requests" not in caplog.text
    assert plan_quantization(ckpt, BuildConfig(quantization="none")).quant.method == "none"
    requantized = plan_quantization(ckpt, BuildConfig(quantization="int8_wo"))
    assert requantized.prequantized is None and requantized.quant.method == "int8_wo"


def test_gguf_quantization_of_a_hf_folder_is_one_line(tiny_checkpoints, tmp_path):
    folder, _ = tiny_checkpoints["llama"]
    with pytest.raises(BuildError, match="--quantization gguf keeps a GGUF file's quantized "
                       "blocks; .* is not a GGUF file"):
        build(folder, tmp_path / "e", BuildConfig(quantization="gguf"), progress=False)
    result = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "build", str(folder), "-o", str(tmp_path / "e"),
         "--quantization", "gguf"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("kiln: error: --quantization gguf keeps")


def test_transformers_reference_of_a_kept_engine(tmp_path):
    """`kiln bench --compare-hf` builds transformers from the engine's weights: a kept
    engine's integer layers (4- and 8-bit, groups of 16 / 32, offsets) and the tied head
    that holds the embedding dequantize to the dequantized engine's weights exactly."""
    from kiln.bench.hf_reference import hf_model_from_engine

    path = tmp_path / "tied.gguf"
    _write_mixed(path, head=Q.Q8_0, tied=True)
    opts = dict(dtype="float32", max_seq_len=256)
    kept = build(path, tmp_path / "kept", BuildConfig(quantization="gguf", **opts),
                 progress=False)
    plain = build(path, tmp_path / "plain", BuildConfig(quantization="none", **opts),
                  progress=False)
    ids = torch.tensor([TOKENS[:20]])
    with torch.no_grad():
        got = hf_model_from_engine(kept)(ids).logits
        want = hf_model_from_engine(plain)(ids).logits
    assert torch.isfinite(want).all() and want.std() > 0
    assert torch.equal(got, want)


# ---- GPU --------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("built_on", ["cpu", "cuda"])
def test_kept_engine_on_gpu_matches_the_cpu_engine(built_on, tmp_path, monkeypatch):
    """A kept GGUF engine loaded on the GPU: the Triton integer GEMMs (the tied Q8_0 head
    too, as a CPU build keeps it, with the embedding reading its rows from it) against
    the same engine dir on the CPU."""
    from kiln import SamplingParams

    path = tmp_path / "tied.gguf"
    _write_mixed(path, head=Q.Q8_0, tied=True)
    if built_on == "cpu":  # what `kiln build` on a machine without CUDA writes
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    engine_dir = build(path, tmp_path / "kept", BuildConfig(
        dtype="float32", max_seq_len=256, quantization="gguf"), progress=False)
    monkeypatch.undo()
    head = load_engine_config(engine_dir).build.quant_layers.get("lm_head")
    assert head == ("int8_g32" if built_on == "cpu" else None)
    cpu, gpu = LLM(engine_dir, device="cpu"), LLM(engine_dir, device="cuda")
    want = sequence_logits(cpu.engine, TOKENS[:32])
    got = sequence_logits(gpu.engine, TOKENS[:32]).float().cpu()
    assert torch.isfinite(want).all() and want.std() > 0
    assert (got - want).abs().mean().item() < 1e-3 * want.abs().max().item()
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(10, 40))]
    assert [o.token_ids for o in gpu.generate(prompts, params)] == \
        [o.token_ids for o in cpu.generate(prompts, params)]
