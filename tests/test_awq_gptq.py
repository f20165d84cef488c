"""INT4 build-time algorithms: GPTQ (kiln/build/gptq.py) and AWQ (kiln/build/awq.py)
against round-to-nearest, on layers and on engines."""

from __future__ import annotations

import pytest
import torch

from kiln import LLM
from kiln.build import build, load_engine_config
from kiln.build.awq import search_scale
from kiln.build.gptq import gptq_int4
from kiln.config import BuildConfig
from kiln.errors import BuildError
from kiln.eval import sequence_logits
from kiln.kernels.reference import dequantize_int_weight, pack_int4
from kiln.layers.weight_only import quantize_int4_asymmetric


def _output_error(x, w, q, scale, offset) -> float:
    return (x @ dequantize_int_weight(pack_int4(q), scale, offset).T - x @ w.T).pow(2).mean()


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """H = identity: no error feedback (H^-1 is diagonal), so GPTQ rounds as RTN does."""
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    q, scale, offset = gptq_int4(w, torch.eye(128), 32)
    q_rtn, scale_rtn, offset_rtn = quantize_int4_asymmetric(w, 32)
    assert torch.equal(q, q_rtn)
    torch.testing.assert_close(scale, scale_rtn)
    torch.testing.assert_close(offset, offset_rtn)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [32, 0])
def test_gptq_halves_the_output_error_of_rtn(act_order, group):
    torch.manual_seed(1)
    w = torch.randn(48, 128)
    x = torch.randn(512, 128) @ torch.randn(128, 128) * 0.3 + torch.randn(128)
    x[:, 5] = 0  # a dead input channel
    q, scale, offset = gptq_int4(w, x.T.double() @ x.double(), group, act_order)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert scale.shape == (48, 128 // (group or 128)) and torch.isfinite(scale).all()
    rtn = quantize_int4_asymmetric(w, group)
    assert _output_error(x, w, q, scale, offset) < 0.6 * _output_error(x, w, *rtn)


def test_awq_scales_protect_channels_with_large_activations():
    torch.manual_seed(2)
    w = torch.randn(64, 128) * 0.1
    x = torch.randn(256, 128)
    x[:, :4] *= 30  # salient channels
    s, alpha, ratio = search_scale(x, w, 32)
    assert alpha > 0 and ratio < 0.8
    assert s[:4].min() > s[4:].max()  # the salient channels are scaled up
    _, alpha_flat, ratio_flat = search_scale(torch.randn(256, 128), w, 32)
    assert ratio_flat <= 1.0  # alpha 0 (RTN) is in the grid: never worse on these rows


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


@pytest.fixture(scope="module")
def errors(tiny_checkpoints, calib_text, tmp_path_factory):
    """mode -> (engine dir, mean |logit - float logit| on the calibration text's tokens)."""
    folder, hf_model = tiny_checkpoints["llama"]
    tokens = list(calib_text.read_bytes()[:200])
    with torch.no_grad():
        want = hf_model(torch.tensor([tokens])).logits[0]
    root = tmp_path_factory.mktemp("int4")
    out = {}
    for mode, act_order in (("int4_wo", False), ("int4_awq", False), ("int4_gptq", False),
                            ("int4_gptq", True)):
        engine_dir = build(folder, root / f"{mode}{act_order}", BuildConfig(
            dtype="float32", max_seq_len=256, quantization=mode, group_size=32,
            calib_file=None if mode == "int4_wo" else str(calib_text), calib_samples=4,
            calib_seq_len=128,
            act_order=act_order), progress=False)
        got = sequence_logits(LLM(engine_dir, device="cpu").engine, tokens)
        out[mode + ("+act_order" if act_order else "")] = (
            engine_dir, (got - want).abs().mean().item())
    return out


def test_awq_and_gptq_engines_beat_rtn(errors):
    """Measured on the tiny llama (group 32): RTN 0.152, AWQ 0.121, GPTQ 0.064."""
    rtn = errors["int4_wo"][1]
    assert errors["int4_awq"][1] < 0.95 * rtn
    assert errors["int4_gptq"][1] < 0.7 * rtn
    assert errors["int4_gptq+act_order"][1] < 0.7 * rtn


@pytest.mark.parametrize("mode", ["int4_awq", "int4_gptq"])
def test_engine_records_the_algorithm_in_int4_storage(mode, errors):
    engine_dir = errors[mode][0]
    cfg = load_engine_config(engine_dir).build
    assert (cfg.quantization, cfg.group_size) == (mode, 32)
    llm = LLM(engine_dir, device="cpu")
    layer = llm.engine.runner.model.model.layers["1"].mlp.down_proj
    assert layer.weight.dtype == torch.uint8 and layer.method.name == mode
    assert layer.weight_scale.shape == (64, 4)


@pytest.mark.parametrize("mode", ["int4_awq", "int4_gptq"])
def test_missing_calibration_text_is_one_line(mode, tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr("kiln.build.quantize.DEFAULT_CALIBRATION_TEXT", tmp_path / "none.txt")
    folder, _ = tiny_checkpoints["llama"]
    with pytest.raises(BuildError, match=f"--quantization {mode} needs calibration text"):
        build(folder, tmp_path / "e", BuildConfig(quantization=mode, group_size=32),
              progress=False)
