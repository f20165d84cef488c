"""Pre-quantized checkpoints and build options (QA, 45th session): compressed-tensors
actorder "weight", GPTQ desc_act with one group a row, packed tensors of the wrong dtype,
a declared KV cache scheme without its scales, --calib-file on checkpoints whose scales
are stored, and numeric build options of the wrong type. Every checkpoint here is
written by hand from its format's definition (no llm-compressor run): a second or so
each on 2 CPU cores."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln import LLM
from kiln.build import build, load_engine_config
from kiln.build.quantize import DEFAULT_CALIBRATION_TEXT, uses_calibration
from kiln.config import BuildConfig
from kiln.errors import BuildError, CheckpointError
from tests import quant_checkpoints as qc
from tests.test_awq_gptq_checkpoints import _against_dequantized, _write

CFG = dict(dtype="float32", max_seq_len=128)
GROUP = 32
KV_SCHEME = dict(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(float folder, its transformers model): qc.TINY_LLAMA, hidden 64, 2 layers."""
    import transformers

    folder = qc.tiny_llama(tmp_path_factory.mktemp("qa45") / "float")
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return folder, model.eval()


def _projections(state: dict) -> list[str]:
    return [k for k in state if ".layers." in k and k.endswith("proj.weight")]


def _save(folder, state: dict, hf_model, quantization_config: dict) -> None:
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = hf_model.config.to_dict()
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))


def _ct_config(fmt: str, weights: dict, inputs: dict | None, **extra) -> dict:
    return dict(quant_method="compressed-tensors", format=fmt, quantization_status="compressed",
                config_groups={"group_0": dict(targets=["Linear"], weights=weights,
                                               input_activations=inputs)},
                ignore=["lm_head"], **extra)


def _pack(values: torch.Tensor) -> torch.Tensor:
    """[rows, 8w] unsigned 4-bit values -> int32 [rows, w], element e in bits 4e."""
    v = values.to(torch.int64).view(values.shape[0], -1, 8)
    words = sum(v[:, :, e] << (4 * e) for e in range(8))
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)


def _pack_quantized(hf_model, folder, symmetric: bool = True, **weights) -> dict:
    """compressed-tensors pack-quantized W4A16 in groups of GROUP (weight_packed,
    weight_scale, weight_shape, weight_zero_point when asymmetric); returns
    {projection: dequantized weight (q - zero) * scale}."""
    torch.manual_seed(5)
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    dequantized = {}
    for name in _projections(state):
        w = state.pop(name).float()
        out, inp = w.shape
        scale = w.view(out, inp // GROUP, GROUP).abs().amax(-1) / 7  # [out, groups]
        zero = torch.zeros_like(scale, dtype=torch.long) if symmetric else \
            torch.randint(-8, 8, scale.shape)
        q = torch.randint(-8, 8, (out, inp))
        dequantized[name] = (q - zero.repeat_interleave(GROUP, 1)).float() * \
            scale.repeat_interleave(GROUP, 1)
        prefix = name.removesuffix(".weight")
        state[f"{prefix}.weight_packed"] = _pack(q + 8)
        state[f"{prefix}.weight_scale"] = scale
        state[f"{prefix}.weight_shape"] = torch.tensor([out, inp])
        if not symmetric:  # packed along the output dimension: [out / 8, groups]
            state[f"{prefix}.weight_zero_point"] = _pack((zero + 8).T.contiguous()).T.contiguous()
    scheme = dict(num_bits=4, type="int", symmetric=symmetric, strategy="group",
                  group_size=GROUP, **weights)
    _save(folder, state, hf_model, _ct_config("pack-quantized", scheme, None))
    return dequantized


def _fp8(hf_model, folder, static: bool = False, kv_scales: str = "all",
         declare_kv: bool = True, kv_scheme: dict | None = None) -> None:
    """compressed-tensors float-quantized FP8: per-channel weight scales, inputs dynamic
    per token (or static: input_scale); with declare_kv a kv_cache_scheme and
    self_attn.k_scale / v_scale in every layer ("all"), none ("none"), or all but
    layer 1's k_scale ("partial")."""
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    for name in _projections(state):
        w = state.pop(name).float()
        scale = w.abs().amax(1, keepdim=True) / qc.FP8_MAX
        prefix = name.removesuffix(".weight")
        state[name] = (w / scale).to(qc.FP8_DTYPE)
        state[f"{prefix}.weight_scale"] = scale
        if static:
            state[f"{prefix}.input_scale"] = torch.tensor([0.02])
    for i in range(hf_model.config.num_hidden_layers):
        for kv, value in (("k", 0.03), ("v", 0.005)):
            if kv_scales == "all" or (kv_scales == "partial" and (i, kv) != (1, "k")):
                state[f"model.layers.{i}.self_attn.{kv}_scale"] = torch.tensor([value + i])
    inputs = dict(num_bits=8, type="float", strategy="tensor" if static else "token",
                  dynamic=not static, symmetric=True)
    weights = dict(num_bits=8, type="float", strategy="channel", dynamic=False,
                   symmetric=True)
    extra = dict(kv_cache_scheme=kv_scheme or KV_SCHEME) if declare_kv else {}
    _save(folder, state, hf_model, _ct_config("float-quantized", weights, inputs, **extra))


def _w8a8(hf_model, folder) -> None:
    """compressed-tensors int-quantized W8A8: int8 weights, per-channel scales [out, 1],
    inputs int8 per token at run time (kiln's int8_sq)."""
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    for name in _projections(state):
        w = state.pop(name).float()
        scale = w.abs().amax(1, keepdim=True) / 127
        state[name] = (w / scale).round().clamp(-127, 127).to(torch.int8)
        state[f"{name.removesuffix('.weight')}.weight_scale"] = scale
    int8 = dict(num_bits=8, type="int", symmetric=True)
    _save(folder, state, hf_model, _ct_config(
        "int-quantized", dict(int8, strategy="channel", dynamic=False),
        dict(int8, strategy="token", dynamic=True)))


def _calib_text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return str(path)


# ---- 1: actorder "weight" (and its alias "static") stores what no actorder stores ----

@pytest.mark.parametrize("actorder", ["weight", "static", None])
def test_pack_quantized_actorder_weight_is_read(actorder, tiny, tmp_path):
    _, hf_model = tiny
    dequantized = _pack_quantized(hf_model, tmp_path / "ckpt", actorder=actorder)
    engine_dir = build(tmp_path / "ckpt", tmp_path / "e", BuildConfig(**CFG), progress=False)
    cfg = load_engine_config(engine_dir).build
    assert (cfg.quantization, cfg.group_size) == ("int4_wo", GROUP)
    _against_dequantized(hf_model, dequantized, engine_dir)


def test_pack_quantized_actorder_group_is_still_refused(tiny, tmp_path):
    _pack_quantized(tiny[1], tmp_path / "ckpt", actorder="group")
    with pytest.raises(CheckpointError, match="actorder 'group' permutes groups; kiln reads "
                       r"actorder weight \(static\) or none"):
        build(tmp_path / "ckpt", tmp_path / "e", BuildConfig(**CFG), progress=False)


# ---- 2: GPTQ desc_act with group_size -1: one group a row, nothing out of order ----

def test_gptq_desc_act_per_channel_is_read(tiny, tmp_path):
    _, hf_model = tiny
    dequantized = _write(hf_model, tmp_path / "gptq", "gptq", dict(desc_act=True), group=0)
    engine_dir = build(tmp_path / "gptq", tmp_path / "e", BuildConfig(**CFG), progress=False)
    assert load_engine_config(engine_dir).build.group_size == 0  # per channel
    _against_dequantized(hf_model, dequantized, engine_dir)


def test_gptq_desc_act_in_groups_is_still_refused(tiny, tmp_path):
    _write(tiny[1], tmp_path / "gptq", "gptq", dict(desc_act=True))
    with pytest.raises(CheckpointError, match="desc_act puts inputs in groups out of order"):
        build(tmp_path / "gptq", tmp_path / "e", BuildConfig(**CFG), progress=False)


# ---- 3: packed tensors of the wrong dtype are refused by name ----

@pytest.mark.parametrize("fmt, suffix, dtype, expected", [
    ("gptq", "qweight", torch.float32, "int32"),
    ("gptq", "qzeros", torch.float32, "int32"),
    ("gptq", "scales", torch.int32, "floating point"),
    ("awq", "qweight", torch.float16, "int32"),
    ("awq", "scales", torch.int16, "floating point"),
    ("ct", "weight_packed", torch.float32, "int32"),
    ("ct", "weight_zero_point", torch.float32, "int32"),
    ("ct", "weight_scale", torch.int32, "floating point"),
])
def test_packed_tensor_of_the_wrong_dtype_is_one_line(fmt, suffix, dtype, expected, tiny,
                                                      tmp_path, capsys):
    from kiln.cli import main

    folder = tmp_path / "ckpt"
    if fmt == "ct":
        _pack_quantized(tiny[1], folder, symmetric=False)
    else:
        _write(tiny[1], folder, fmt)
    state = load_file(str(folder / "model.safetensors"))
    name = f"model.layers.1.self_attn.o_proj.{suffix}"
    state[name] = state[name].to(dtype)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shown = str(dtype).removeprefix("torch.")
    assert main(["build", str(folder), "-o", str(tmp_path / "e"), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kiln: error: checkpoint tensor {name} is {shown}, where the ")
    assert f"format stores {expected}" in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and not (tmp_path / "e").exists()


# ---- 4: a declared kv_cache_scheme needs its k / v scales ----

def _kv_scales(engine_dir) -> dict[str, float]:
    state = load_file(str(engine_dir / "rank0.safetensors"))
    return {k: round(v[0].item(), 4) for k, v in state.items() if k.endswith("_scale")
            and ".attn." in k}


def test_declared_kv_scales_are_loaded(tiny, tmp_path):
    _fp8(tiny[1], tmp_path / "ckpt")
    engine_dir = build(tmp_path / "ckpt", tmp_path / "e", BuildConfig(**CFG), progress=False)
    assert load_engine_config(engine_dir).build.kv_cache_dtype == "fp8"
    assert _kv_scales(engine_dir) == {
        "model.layers.0.self_attn.attn.k_scale": 0.03, "model.layers.0.self_attn.attn.v_scale":
        0.005, "model.layers.1.self_attn.attn.k_scale": 1.03,
        "model.layers.1.self_attn.attn.v_scale": 1.005}


@pytest.mark.parametrize("kv_scales, message", [
    ("none", r"checkpoint is missing 4 tensor\(s\): model\.layers\.0\.self_attn\.attn\."
     r"k_scale, .*; its kv_cache_scheme needs every attention layer's k_scale and v_scale"),
    ("partial", r"checkpoint is missing 1 tensor\(s\): model\.layers\.1\.self_attn\.attn\."
     r"k_scale \(it read model\.safetensors\); its kv_cache_scheme needs"),
])
def test_declared_kv_scheme_without_its_scales_is_refused(kv_scales, message, tiny, tmp_path):
    _fp8(tiny[1], tmp_path / "ckpt", kv_scales=kv_scales)
    with pytest.raises(CheckpointError, match=message):
        build(tmp_path / "ckpt", tmp_path / "e", BuildConfig(**CFG), progress=False)
    assert not (tmp_path / "e").exists()


def test_dynamic_kv_scheme_keeps_a_16_bit_cache(tiny, tmp_path, caplog):
    """A dynamic kv_cache_scheme stores no scales (they come from each step's keys and
    values): the engine keeps a 16-bit cache and says why; fp8 asked: static scales."""
    _fp8(tiny[1], tmp_path / "ckpt", kv_scales="none", kv_scheme=dict(KV_SCHEME, dynamic=True))
    with caplog.at_level("WARNING", logger="kiln.build.prequantized"):
        engine_dir = build(tmp_path / "ckpt", tmp_path / "e", BuildConfig(**CFG),
                           progress=False)
    assert load_engine_config(engine_dir).build.kv_cache_dtype == "auto"
    assert _kv_scales(engine_dir) == {}
    assert "kv_cache_scheme is dynamic" in caplog.text and "stays 16-bit" in caplog.text
    fp8 = build(tmp_path / "ckpt", tmp_path / "e8", BuildConfig(**CFG, kv_cache_dtype="fp8"),
                progress=False)
    assert load_engine_config(fp8).build.kv_cache_dtype == "fp8"
    assert set(_kv_scales(fp8).values()) == {1.0}


def test_asymmetric_kv_scheme_is_refused(tiny, tmp_path):
    _fp8(tiny[1], tmp_path / "ckpt", kv_scheme=dict(KV_SCHEME, symmetric=False))
    with pytest.raises(CheckpointError, match="unsupported kv_cache_scheme .*symmetric"):
        build(tmp_path / "ckpt", tmp_path / "e", BuildConfig(**CFG), progress=False)


def test_missing_kv_scales_are_calibrated_when_asked(tiny, tmp_path):
    """--calib-file replaces a checkpoint's KV scales: then none need be stored."""
    _fp8(tiny[1], tmp_path / "ckpt", kv_scales="none")
    engine_dir = build(tmp_path / "ckpt", tmp_path / "e", BuildConfig(
        **CFG, calib_file=_calib_text(tmp_path), calib_samples=2, calib_seq_len=32),
        progress=False)
    scales = _kv_scales(engine_dir)
    assert len(scales) == 4 and all(v != 1.0 for v in scales.values()), scales


def test_modelopt_kv_scales_are_all_or_none(tiny, tmp_path):
    """modelopt's fp8_cast stores no KV scales (1.0; tests/test_quant_checkpoints.py);
    some layers' scales without the others' is a damaged export."""
    folder = qc.modelopt_fp8(tiny[0], tmp_path / "ckpt", kv_cache="fp8")
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.0.self_attn.v_proj.v_scale"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model\.layers\.0\."
                       r"self_attn\.attn\.v_scale .*; it holds the KV cache scales of some "
                       "attention layers only"):
        build(folder, tmp_path / "e", BuildConfig(**CFG), progress=False)


def test_kilns_own_fp8_kv_keeps_scale_one_without_calibration(tiny, tmp_path):
    """A pre-quantized checkpoint without a KV scheme, --kv-cache-dtype fp8: 1.0, as vLLM."""
    _fp8(tiny[1], tmp_path / "ckpt", kv_scales="none", declare_kv=False)
    engine_dir = build(tmp_path / "ckpt", tmp_path / "e",
                       BuildConfig(**CFG, kv_cache_dtype="fp8"), progress=False)
    assert set(_kv_scales(engine_dir).values()) == {1.0}


# ---- 5: --calib-file on a pre-quantized checkpoint calibrates only its KV cache ----

@pytest.mark.parametrize("kind", ["fp8 static", "fp8 dynamic", "w8a8"])
def test_calib_file_that_changes_nothing_is_refused(kind, tiny, tmp_path):
    if kind == "w8a8":
        _w8a8(tiny[1], tmp_path / "ckpt")
    else:
        _fp8(tiny[1], tmp_path / "ckpt", static=kind == "fp8 static", declare_kv=False,
             kv_scales="none")
    with pytest.raises(BuildError, match=r"--calib-file has no effect on .*ckpt: it is "
                       r"already quantized \(compressed-tensors, (fp8|int8_sq), its scales "
                       r"stored\), and calibration would only set fp8/int8 KV cache scales"):
        build(tmp_path / "ckpt", tmp_path / "e",
              BuildConfig(**CFG, calib_file=_calib_text(tmp_path)), progress=False)


def test_int8_sq_on_a_w8a8_checkpoint_calibrates_nothing(tiny, tmp_path, monkeypatch):
    _w8a8(tiny[1], tmp_path / "ckpt")
    reference = build(tmp_path / "ckpt", tmp_path / "auto", BuildConfig(**CFG), progress=False)

    def calibrate(*args, **kwargs):
        raise AssertionError("calibrated a checkpoint whose scales are stored")

    monkeypatch.setattr("kiln.build.builder.calibrate_checkpoint", calibrate)
    engine_dir = build(tmp_path / "ckpt", tmp_path / "e",
                       BuildConfig(**CFG, quantization="int8_sq"), progress=False)
    cfg = load_engine_config(engine_dir).build
    assert (cfg.quantization, cfg.calib_file) == ("int8_sq", None)
    got, want = (load_file(str(d / "rank0.safetensors")) for d in (engine_dir, reference))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_w8a8_kv_cache_is_still_calibrated(tiny, tmp_path):
    """Its KV cache is what a W8A8 checkpoint's calibration sets: with --calib-file, and
    with kiln's text where int8_sq is named (as for float weights)."""
    _w8a8(tiny[1], tmp_path / "ckpt")
    calib = dict(calib_samples=2, calib_seq_len=32)
    given = build(tmp_path / "ckpt", tmp_path / "given", BuildConfig(
        **CFG, **calib, kv_cache_dtype="int8", calib_file=_calib_text(tmp_path)),
        progress=False)
    default = build(tmp_path / "ckpt", tmp_path / "default", BuildConfig(
        **CFG, **calib, kv_cache_dtype="int8", quantization="int8_sq"), progress=False)
    assert load_engine_config(default).build.calib_file == str(DEFAULT_CALIBRATION_TEXT)
    for engine_dir in (given, default):
        scales = _kv_scales(engine_dir)
        assert len(scales) == 4 and 1.0 not in scales.values(), scales


def test_uses_calibration_of_a_prequantized_checkpoint():
    assert uses_calibration("fp8", "static", "auto")
    assert not uses_calibration("fp8", "static", "auto", prequantized=True)
    assert not uses_calibration("int8_sq", "dynamic", "auto", prequantized=True)
    assert uses_calibration("int8_sq", "dynamic", "fp8", prequantized=True)
    assert uses_calibration("int4_wo", "dynamic", "int8", prequantized=True)


# ---- 6: numeric build options of the wrong type ----

@pytest.mark.parametrize("option, message", [
    (dict(quantization="int4_wo", group_size="32"),
     r"--group-size \(group_size\) must be a whole number, got '32' \(str\)"),
    (dict(quantization="int8_sq", smooth_alpha="0.5"),
     r"--smooth-alpha \(smooth_alpha\) must be a number, got '0.5' \(str\)"),
    (dict(block_size=16.0), r"--block-size \(block_size\) must be a whole number, got 16.0"),
    (dict(tp_size=True), r"--tp-size \(tp_size\) must be a whole number, got True \(bool\)"),
    (dict(calib_samples=None), r"--calib-samples \(calib_samples\) must be a whole number"),
])
def test_numeric_option_of_the_wrong_type_is_one_error(option, message, tiny, tmp_path,
                                                       monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BuildError, match=message):
        build(tiny[0], tmp_path / "e", BuildConfig(**CFG, **option), progress=False)
    with pytest.raises(BuildError, match=message):  # LLM(...) checks before its cache
        LLM(tiny[0], device="cpu", **option)


def test_numeric_options_of_the_right_type_still_build(tiny, tmp_path):
    build(tiny[0], tmp_path / "e", BuildConfig(**CFG, quantization="int8_sq", smooth_alpha=1,
                                               calib_samples=2, calib_seq_len=32),
          progress=False)


# ---- FP8 / int8 weights stored as floats: exact codes load, anything else is refused ----
@pytest.mark.parametrize("kind", ["fp8", "w8a8"])
@pytest.mark.parametrize("codes", [True, False])
def test_float_stored_quantized_weight(kind, codes, tiny, tmp_path, capsys):
    from kiln.cli import main

    folder = tmp_path / "ckpt"
    (_fp8 if kind == "fp8" else _w8a8)(tiny[1], folder)
    engine = build(folder, tmp_path / "ref", BuildConfig(**CFG), progress=False)
    state = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    state[name] = state[name].float() if codes else state[name].float() + 0.25
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    code = main(["build", str(folder), "-o", str(tmp_path / "e"), "--dtype", "float32"])
    err = capsys.readouterr().err.strip()
    if codes:  # the same engine as from the 1-byte tensor
        assert code == 0, err
        want = load_file(str(engine / "rank0.safetensors"))
        got = load_file(str(tmp_path / "e" / "rank0.safetensors"))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        return
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"checkpoint tensor {name!r} is float32 with values that are not" in err
    assert "Traceback" not in err and not (tmp_path / "e").exists()
