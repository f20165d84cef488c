"""SmoothQuant INT8 W8A8 engines (int8_sq): the reference GEMM against integer
arithmetic, engines against an independent simulation (tests/fake_quant.py), the
default calibration text, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from kiln import LLM
from kiln.build import build, load_engine_config
from kiln.build.quantize import DEFAULT_CALIBRATION_TEXT
from kiln.config import BuildConfig
from kiln.errors import BuildError
from kiln.eval import sequence_logits
from kiln.kernels import reference as ref
from tests.fake_quant import simulate, smoothquant_weights

TOKENS = list(range(3, 120))


def test_int8_linear_is_the_integer_product_times_scales():
    torch.manual_seed(0)
    x = torch.randn(5, 96) * torch.tensor([1.0, 10, 0.01, 3, 1])[:, None]
    w_q = torch.randint(-127, 128, (40, 96), dtype=torch.int8)
    w_scale = torch.rand(40) * 0.01
    bias = torch.randn(40)
    x_q, x_scale = ref.quantize_int8_per_token(x)
    assert torch.equal(x_scale, x.abs().amax(-1, keepdim=True) / 127)
    assert torch.equal(x_q.float(), (x / x_scale).round())
    assert (x_q.abs().amax(-1) == 127).all()
    exact = (x_q.long() @ w_q.long().T).double()
    want = (exact * x_scale.double() * w_scale.double() + bias.double()).float()
    torch.testing.assert_close(ref.int8_linear(x, w_q, w_scale, bias), want,
                               rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_bytes((bytes(range(32, 127)) + b"\n") * 32)  # tiny models: bytes are ids
    return path


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothquant_engine_matches_its_simulation(alpha, tiny_checkpoints, tmp_path,
                                                   calib_text):
    """The smoothed int8 weights are identical to the simulation's (checked: no value
    differs), but per-token activation rounding can flip where the two sides' float32
    sums differ by noise, and a flip in an early K/V row moves every later logit. Measured
    with alpha 0.8: one flip at token 2, mean error 0.2x the scheme's own (alpha 0.5: no
    flip, 1e-7); a wrong alpha (0.8 or 0 against 0.5) errs by 1.2-1.3x. So: mean within
    35% of the scheme's mean error, max within 75% of its max."""
    folder, hf_model = tiny_checkpoints["llama"]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(
        dtype="float32", max_seq_len=256, quantization="int8_sq", calib_file=str(calib_text),
        calib_samples=4, calib_seq_len=128, smooth_alpha=alpha), progress=False)
    got = sequence_logits(LLM(engine_dir, device="cpu").engine, TOKENS)
    ids = [b % 256 for b in calib_text.read_bytes()]
    windows = [ids[i:i + 128] for i in range(0, len(ids), 128)][:4]
    sim = copy.deepcopy(hf_model)
    smoothquant_weights(sim, windows, alpha)
    with torch.no_grad():
        plain = hf_model(torch.tensor([TOKENS])).logits[0]
        with simulate(sim, int8=True):
            want = sim(torch.tensor([TOKENS])).logits[0]
    scheme = (want - plain).abs()
    assert scheme.max().item() > 0.01
    diff = (got - want).abs()
    assert diff.mean().item() < 0.35 * scheme.mean().item(), (diff.mean(), scheme.mean())
    assert diff.max().item() < 0.75 * scheme.max().item(), (diff.max(), scheme.max())


def test_int8_sq_uses_the_shipped_text_and_combines_with_int8_kv(tiny_checkpoints, tmp_path):
    assert DEFAULT_CALIBRATION_TEXT.is_file()
    size = DEFAULT_CALIBRATION_TEXT.stat().st_size
    assert 50_000 < size < 400_000
    folder, _ = tiny_checkpoints["starcoder2"]  # LayerNorm with bias, plain GELU MLP
    engine_dir = build(folder, tmp_path / "e", BuildConfig(
        dtype="float32", max_seq_len=256, quantization="int8_sq", kv_cache_dtype="int8",
        calib_samples=2, calib_seq_len=64), progress=False)
    cfg = load_engine_config(engine_dir).build
    assert (cfg.quantization, cfg.kv_cache_dtype) == ("int8_sq", "int8")
    assert cfg.calib_file == str(DEFAULT_CALIBRATION_TEXT)
    llm = LLM(engine_dir, device="cpu")
    layer = llm.engine.runner.model.model.layers["0"].mlp.c_fc
    assert layer.weight.dtype == torch.int8 and layer.method.name == "int8_sq"
    assert len(llm.generate([5, 6, 7])[0].token_ids) > 0


def test_missing_default_calibration_text_is_one_line(tiny_checkpoints, tmp_path,
                                                      monkeypatch):
    monkeypatch.setattr("kiln.build.quantize.DEFAULT_CALIBRATION_TEXT",
                        tmp_path / "nowhere.txt")
    folder, _ = tiny_checkpoints["llama"]
    with pytest.raises(BuildError, match="int8_sq needs calibration text and kiln's default "
                       r"\(.*nowhere.txt\) is missing from this install; add --calib-file"):
        build(folder, tmp_path / "e", BuildConfig(quantization="int8_sq"), progress=False)


@pytest.mark.parametrize("method", ["int8_sq", "int4_awq"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3", "gpt-neox", "falcon-new",
                                  "starcoder2", "phi", "falcon", "qwen2-moe"])
def test_smoothing_leaves_the_float_model_unchanged(method, arch, tiny_checkpoints, tmp_path,
                                                    monkeypatch):
    """Dividing the norm (or up projection) that produces a linear layer's input by
    per-channel factors and multiplying them into the layer's weight is the identity in
    float, if that norm feeds exactly the layers scaled: Gemma 2/3's MLP takes
    pre_feedforward_layernorm's output (post_attention_layernorm normalises attention's),
    and Phi-2's and Falcon-7B's one norm feeds attention and MLP, which must share the
    factors. SmoothQuant's and AWQ's folds (before any rounding) on a float engine."""
    from kiln.build.awq import awq_model
    from kiln.build.smoothquant import scaled_inputs, smooth_model
    from kiln.distributed import Mapping

    monkeypatch.setenv("KILN_CPU_PACK", "0")  # linear layers read the weights edited below
    folder, _ = tiny_checkpoints[arch]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(dtype="float32", max_seq_len=256),
                       progress=False)
    llm = LLM(engine_dir, device="cpu")
    before = sequence_logits(llm.engine, TOKENS)
    model = llm.engine.runner.model
    torch.manual_seed(0)
    channels = {key: torch.rand(linears[0].weight.shape[1]) * 20 + 0.05
                for name, layer in model.named_modules()
                for _, _, linears, key in scaled_inputs(name, layer)}
    assert channels
    with torch.no_grad():
        if method == "int8_sq":
            smooth_model(model, channels, 0.5, Mapping())
        else:
            inputs = {key: [torch.randn(64, len(c)) * c] for key, c in channels.items()}
            alphas = awq_model(model, inputs, 32, Mapping(), progress=False)
            assert max(alphas.values()) > 0
    after = sequence_logits(llm.engine, TOKENS)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_int8_sq_engine_is_close_to_the_float_model(arch, tiny_checkpoints, tmp_path,
                                                    calib_text):
    """One tolerance for every architecture: measured, llama 0.038 and Gemma 2 0.048 of
    the largest logit (Gemma 2 with the MLP's factors in post_attention_layernorm: 0.7)."""
    folder, hf_model = tiny_checkpoints[arch]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(
        dtype="float32", max_seq_len=256, quantization="int8_sq", calib_file=str(calib_text),
        calib_samples=4, calib_seq_len=128), progress=False)
    got = sequence_logits(LLM(engine_dir, device="cpu").engine, TOKENS)
    with torch.no_grad():
        want = hf_model(torch.tensor([TOKENS])).logits[0]
    assert (got - want).abs().max().item() < 0.08 * want.abs().max().item()
