"""YaRN rope scaling against transformers: the rotary table, a HF folder's and a GGUF's
logits, and the Triton rotary kernel reading the table (through Triton's interpreter)."""

from __future__ import annotations

import importlib.util
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch

from kiln.layers.rotary import RotaryEmbedding, attention_factor, inverse_frequencies

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
YARN_TUNED = {**YARN, "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 0.8}
TOKENS = [(i * 37) % 250 + 3 for i in range(200)]  # past the original 64 positions


@pytest.mark.parametrize("theta,head_dim,scaling", [
    (10000.0, 64, YARN), (1e6, 128, {**YARN, "original_max_position_embeddings": 32768}),
    (500000.0, 128, {**YARN, "factor": 8.0, "truncate": False}), (10000.0, 32, YARN_TUNED),
    (10000.0, 64, {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5})])
def test_yarn_table_matches_transformers(theta, head_dim, scaling) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4,
                      max_position_embeddings=4 * scaling["original_max_position_embeddings"],
                      rope_parameters={"rope_theta": theta, **scaling})
    want, want_scale = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    torch.testing.assert_close(inverse_frequencies(head_dim, theta, scaling), want,
                               atol=1e-7, rtol=1e-6)
    assert attention_factor(scaling) == pytest.approx(want_scale)
    table = RotaryEmbedding(head_dim, 16, theta, scaling).cos_sin
    positions = torch.arange(16, dtype=torch.float32)[:, None] * want
    torch.testing.assert_close(table, torch.cat([positions.cos(), positions.sin()], -1)
                               * want_scale)


def _hf_qwen2(folder: Path, scaling: dict[str, Any]):
    from tests.conftest import make_hf_model

    configs = {"qwen2": ("Qwen2Config", dict(max_position_embeddings=256,
                                             rope_parameters={"rope_theta": 10000.0,
                                                              **scaling}))}
    return make_hf_model("qwen2", folder, configs=configs)


def _kiln_logits(source: Path, engine: Path) -> torch.Tensor:
    from kiln import LLM
    from kiln.build import build
    from kiln.config import BuildConfig
    from kiln.eval import sequence_logits

    build(source, engine, BuildConfig(dtype="float32", max_seq_len=256), progress=False)
    return sequence_logits(LLM(engine, device="cpu").engine, TOKENS)


@pytest.mark.parametrize("scaling", [YARN, YARN_TUNED], ids=["default", "tuned"])
def test_yarn_hf_folder_logits_match_transformers(tmp_path: Path, scaling) -> None:
    model = _hf_qwen2(tmp_path / "hf", scaling)
    with torch.no_grad():
        want = model(torch.tensor([TOKENS])).logits[0]
    got = _kiln_logits(tmp_path / "hf", tmp_path / "engine")
    assert (got - want).abs().max() < 1e-4


def _write_gguf(model, path: Path, meta: dict[str, tuple]) -> None:
    """The HF Qwen2 model as llama.cpp's converter writes it (no Q/K permutation)."""
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    for key, value in meta.items():
        w.add_key_value(key, *value)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, kind = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{kind}", t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_yarn_gguf_logits_match_transformers(tmp_path: Path) -> None:
    """A GGUF's rope.scaling.* keys (as llama.cpp's converter writes a config's yarn)."""
    from kiln.checkpoint.gguf import GGUFCheckpoint
    from kiln.errors import CheckpointError

    model = _hf_qwen2(tmp_path / "hf", YARN_TUNED)
    F32, T = gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType
    key = "qwen2.rope.scaling."
    meta = {key + "type": ("yarn", T.STRING), key + "factor": (4.0, F32),
            key + "original_context_length": (64, T.UINT32),
            key + "yarn_beta_fast": (16.0, F32), key + "yarn_beta_slow": (2.0, F32),
            key + "yarn_attn_factor": (0.8, F32)}
    _write_gguf(model, tmp_path / "m.gguf", meta)
    assert GGUFCheckpoint(tmp_path / "m.gguf").config.rope_scaling == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 0.8}
    with torch.no_grad():
        want = model(torch.tensor([TOKENS])).logits[0]
    got = _kiln_logits(tmp_path / "m.gguf", tmp_path / "engine")
    assert (got - want).abs().max() < 1e-4
    # llama.cpp-only knobs that transformers' yarn has no equivalent of: one line.
    _write_gguf(model, tmp_path / "ext.gguf", {**meta, key + "yarn_ext_factor": (0.5, F32)})
    with pytest.raises(CheckpointError, match="yarn_ext_factor = 0.5") as e:
        GGUFCheckpoint(tmp_path / "ext.gguf")
    assert "\n" not in str(e.value)
    _write_gguf(model, tmp_path / "odd.gguf", {key + "type": ("dynamic", T.STRING)})
    with pytest.raises(CheckpointError, match="kiln reads none, linear and yarn"):
        GGUFCheckpoint(tmp_path / "odd.gguf")


def check_rotary_kernel_with_yarn_table(dtype: torch.dtype, atol: float, rtol: float) -> None:
    """In the interpreter worker: the Triton rotary + KV write with a YaRN table (cos/sin
    scaled by the attention factor) matches the torch reference."""
    from kiln.kernels import reference as ref
    from kiln.kernels.rotary_kv import rotary_and_write_kv
    from tests.test_kernels import _close

    torch.manual_seed(0)
    heads, kv_heads, head_dim, block_size = 4, 2, 64, 16
    cos_sin = RotaryEmbedding(head_dim, 256, 10000.0, YARN).cos_sin
    assert cos_sin.abs().max() > 1.1  # the attention factor is in the table
    qkv = torch.randn(6, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    positions = torch.tensor([0, 1, 63, 64, 200, 255])
    slots = torch.tensor([0, 1, 17, 18, 40, 63])
    caches = [torch.zeros(4, block_size, kv_heads, head_dim, dtype=dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    got = rotary_and_write_kv(q, k, v, positions, cos_sin, *caches, slots, head_dim)
    want = ref.rotary_and_write_kv(q, k, v, positions, cos_sin, *ref_caches, slots, head_dim)
    _close("q", got, want, atol, rtol)
    _close("k_cache", caches[0], ref_caches[0], atol, rtol)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_rotary_kernel_reads_the_yarn_table() -> None:
    from tests.test_kernels import F32, _init_worker

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_init_worker) as pool:
        pool.submit(check_rotary_kernel_with_yarn_table, *F32).result()
