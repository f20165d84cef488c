"""The FP8 checkpoint fixtures of tests/quant_checkpoints.py make what they claim.

compressed-tensors cases need llmcompressor (skipped without it); modelopt cases need only
transformers. Whole file: a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open

from tests import quant_checkpoints as qc

pytest.importorskip("transformers")

LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# FP8 E4M3: a value in the top binade [256, 448] has ulp 32, so round-to-nearest is off by at
# most 16 units of the scale.
MAX_ROUNDING_UNITS = 16.0
# Relative RMS error of the FP8 logits against the float model's. Measured 0.11-0.13 for every
# scheme on this 2-layer random model (weight-only FP8 alone: 0.076); the bound leaves room for
# other seeds and library versions, far below what a missing or wrong scale gives.
MAX_REL_RMS = 0.3


def _header(path):
    """name -> (dtype string as in safetensors, shape list), and the flat tensor dict."""
    out, tensors = {}, {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                sl = sf.get_slice(k)
                out[k] = (sl.get_dtype(), list(sl.get_shape()))
                tensors[k] = sf.get_tensor(k)
    return out, tensors


def _rel_rms(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fp8ckpt")


@pytest.fixture(scope="module")
def float_ckpt(root):
    return qc.tiny_llama(root / "float")


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def float_logits(float_ckpt, input_ids):
    return qc.reference_logits(float_ckpt, input_ids)


@pytest.fixture(scope="module")
def ct_ckpts(root, float_ckpt):
    """(scheme, kv) -> compressed-tensors checkpoint dir, made lazily once per module."""
    pytest.importorskip("llmcompressor")
    cache = {}

    def get(scheme, kv):
        if (scheme, kv) not in cache:
            cache[scheme, kv] = qc.compressed_tensors_fp8(
                float_ckpt, root / f"ct-{scheme}-{kv}", scheme, kv_cache=kv)
        return cache[scheme, kv]
    return get


@pytest.fixture(scope="module")
def mo_ckpts(root, float_ckpt):
    cache = {}

    def get(kv, style="current"):
        if (kv, style) not in cache:
            cache[kv, style] = qc.modelopt_fp8(
                float_ckpt, root / f"mo-{kv}-{style}", kv_cache=kv, config_style=style)
        return cache[kv, style]
    return get


def test_tiny_llama_is_float32(float_ckpt):
    header, _ = _header(float_ckpt)
    assert {dt for dt, _ in header.values()} == {"F32"}
    cfg = json.loads((float_ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 128, 2)
    assert "quantization_config" not in cfg


def _check_fp8_weights(header, tensors, float_tensors, scale_shape):
    for layer in range(2):
        for suffix in LINEAR_SUFFIXES:
            name = f"model.layers.{layer}.{suffix}"
            dtype, shape = header[f"{name}.weight"]
            assert dtype == "F8_E4M3"
            assert shape == list(float_tensors[f"{name}.weight"].shape)
            sdt, sshape = header[f"{name}.weight_scale"]
            assert sdt == "F32"
            assert sshape == scale_shape(shape)
            w = float_tensors[f"{name}.weight"]
            scale = tensors[f"{name}.weight_scale"]
            deq = tensors[f"{name}.weight"].float() * scale
            assert ((deq - w).abs() <= MAX_ROUNDING_UNITS * scale + 1e-12).all(), name
    assert header["lm_head.weight"][0] == "F32"
    assert not [k for k in header if k.startswith("lm_head.") and k != "lm_head.weight"]
    assert header["model.embed_tokens.weight"][0] == "F32"


@pytest.mark.parametrize("scheme,kv", [("FP8_DYNAMIC", False), ("FP8", False), ("FP8", True)])
def test_compressed_tensors_layout(ct_ckpts, float_ckpt, scheme, kv):
    path = ct_ckpts(scheme, kv)
    header, tensors = _header(path)
    _, float_tensors = _header(float_ckpt)
    per_channel = scheme == "FP8_DYNAMIC"
    _check_fp8_weights(header, tensors, float_tensors,
                       (lambda s: [s[0], 1]) if per_channel else (lambda s: [1]))
    input_scales = [k for k in header if k.endswith(".input_scale")]
    if per_channel:
        assert input_scales == []
    else:
        assert len(input_scales) == 2 * len(LINEAR_SUFFIXES)
        assert all(header[k] == ("F32", [1]) for k in input_scales)
    kv_keys = sorted(k for k in header if k.endswith((".k_scale", ".v_scale")))
    if kv:
        assert kv_keys == [f"model.layers.{i}.self_attn.{n}_scale" for i in (0, 1) for n in "kv"]
        assert all(header[k] == ("F32", [1]) and tensors[k].item() > 0 for k in kv_keys)
    else:
        assert kv_keys == []

    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    assert qcfg["format"] == "float-quantized"
    assert qcfg["quantization_status"] == "compressed"
    assert qcfg["ignore"] == ["lm_head"]
    (group,) = qcfg["config_groups"].values()
    assert group["targets"] == ["Linear"]
    w, a = group["weights"], group["input_activations"]
    assert (w["type"], w["num_bits"], w["dynamic"]) == ("float", 8, False)
    assert w["strategy"] == ("channel" if per_channel else "tensor")
    assert (a["type"], a["num_bits"], a["dynamic"]) == ("float", 8, per_channel)
    assert a["strategy"] == ("token" if per_channel else "tensor")
    if kv:
        k = qcfg["kv_cache_scheme"]
        assert (k["type"], k["num_bits"], k["strategy"], k["dynamic"]) == \
            ("float", 8, "tensor", False)
    else:
        assert qcfg["kv_cache_scheme"] is None


@pytest.mark.parametrize("kv", [False, "fp8", "fp8_clamped", "fp8_cast"])
def test_modelopt_layout(mo_ckpts, float_ckpt, kv):
    path = mo_ckpts(kv)
    header, tensors = _header(path)
    _, float_tensors = _header(float_ckpt)
    _check_fp8_weights(header, tensors, float_tensors, lambda s: [])
    for layer in range(2):
        for suffix in LINEAR_SUFFIXES:
            name = f"model.layers.{layer}.{suffix}"
            # weight_scale is exactly max|W| / 448, and the weight its plain cast.
            w = float_tensors[f"{name}.weight"]
            assert tensors[f"{name}.weight_scale"].item() == \
                torch.tensor(w.abs().max().item() / 448.0).item()
            assert torch.equal(tensors[f"{name}.weight"],
                               (w / tensors[f"{name}.weight_scale"]).to(torch.float8_e4m3fn))
            assert header[f"{name}.input_scale"] == ("F32", [])
    kv_keys = sorted(k for k in header if k.endswith((".k_scale", ".v_scale")))
    if kv in ("fp8", "fp8_clamped"):
        assert kv_keys == [f"model.layers.{i}.self_attn.{p}_proj.{p}_scale"
                           for i in (0, 1) for p in "kv"]
        assert all(header[k] == ("F32", []) for k in kv_keys)
        values = [tensors[k].item() for k in kv_keys]
        assert all(v == 1.0 for v in values) if kv == "fp8_clamped" else \
            all(0 < v < 1 for v in values)
    else:
        assert kv_keys == []

    hqc = json.loads((path / "hf_quant_config.json").read_text())
    assert hqc["producer"]["name"] == "modelopt"
    assert hqc["quantization"] == {"quant_algo": "FP8",
                                   "kv_cache_quant_algo": "FP8" if kv else None,
                                   "exclude_modules": ["lm_head"]}
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "modelopt"
    assert qcfg["quant_algo"] == "FP8"
    assert qcfg["ignore"] == ["lm_head"]
    assert qcfg["producer"] == hqc["producer"]
    assert qcfg["config_groups"]["group_0"]["weights"] == \
        {"dynamic": False, "num_bits": 8, "type": "float"}
    assert ("kv_cache_scheme" in qcfg) == bool(kv)


def test_modelopt_legacy_has_only_hf_quant_config(mo_ckpts):
    path = mo_ckpts("fp8_clamped", "legacy")
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    hqc = json.loads((path / "hf_quant_config.json").read_text())
    assert hqc["quantization"]["kv_cache_quant_algo"] == "FP8"


def _check_logits(logits, float_logits):
    assert logits.shape == float_logits.shape
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    err = _rel_rms(logits, float_logits)
    assert 1e-4 < err < MAX_REL_RMS, err  # quantized (not the float model), yet close


@pytest.mark.parametrize("scheme,kv", [("FP8_DYNAMIC", False), ("FP8", False), ("FP8", True)])
def test_compressed_tensors_reference(ct_ckpts, input_ids, float_logits, scheme, kv):
    path = ct_ckpts(scheme, kv)
    if kv and not qc.ct_kv_cache_supported():
        # transformers >= 5.24: the oracle falls back to the emulation, and says so.
        with pytest.warns(UserWarning, match="KV cache unquantized"):
            ref = qc.reference_logits(path, input_ids)
    else:
        ref = qc.reference_logits(path, input_ids)
    _check_logits(ref, float_logits)
    # transformers' compressed-tensors numerics are exactly: dequantized weights, fake-quantized
    # linear inputs (static per tensor / dynamic per token), fake-quantized post-RoPE K and V.
    emulated = qc.fp8_emulation_model(path)(input_ids, use_cache=False).logits
    torch.testing.assert_close(emulated, ref, atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert qc.reference_logits(path, input_ids[0]).shape == ref.shape[1:]  # [S] input


@pytest.mark.parametrize("kv", [False, "fp8", "fp8_clamped", "fp8_cast"])
def test_modelopt_reference(mo_ckpts, input_ids, float_logits, kv):
    ref = qc.reference_logits(mo_ckpts(kv), input_ids)
    _check_logits(ref, float_logits)


def test_modelopt_static_fp8_matches_transformers_compressed_tensors(
        ct_ckpts, mo_ckpts, input_ids):
    """Same scales (max|W|/448 per tensor, calibration max|x|/448) in both formats: the
    hand-written modelopt oracle equals what transformers computes for llm-compressor's FP8."""
    ct = qc.reference_logits(ct_ckpts("FP8", False), input_ids)
    mo = qc.reference_logits(mo_ckpts(False), input_ids)
    torch.testing.assert_close(mo, ct, atol=1e-5, rtol=1e-5)
