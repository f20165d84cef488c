"""FP8 W8A8 engines and 1-byte KV caches: reference numerics, engines vs an independent
simulation of each scheme on transformers, engine dir contents, and bad input."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from kiln import LLM
from kiln.build import build, load_engine_config
from kiln.config import BuildConfig
from kiln.errors import BuildError, KilnError
from kiln.eval import sequence_logits
from kiln.kernels import reference as ref
from tests.fake_quant import fp8_weights, simulate

E4M3 = torch.float8_e4m3fn
# Every finite e4m3fn value, to check rounding against the definition.
E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
E4M3_VALUES = E4M3_VALUES[E4M3_VALUES.isfinite()].unique()


def nearest_e4m3(x: torch.Tensor) -> torch.Tensor:
    idx = (x.reshape(-1, 1) - E4M3_VALUES).abs().argmin(dim=1)
    return E4M3_VALUES[idx].view(x.shape)


# ---- reference helpers vs direct computation -----------------------------------------
def test_fp8_per_token_quantization_is_nearest_e4m3_of_x_over_amax():
    torch.manual_seed(0)
    x = torch.randn(7, 33) * torch.tensor([0.01, 1, 30, 1e3, 1, 1, 5])[:, None]
    x[3] = 0.0  # a zero row still gets a finite scale
    q, scale = ref.quantize_fp8_per_token(x)
    assert q.dtype == E4M3 and scale.shape == (7, 1) and scale.dtype == torch.float32
    amax = x.abs().amax(-1, keepdim=True).clamp_min(1e-6)
    assert torch.equal(scale, amax / 448)
    assert torch.equal(q.float(), nearest_e4m3(x / scale))  # random data: no exact ties
    assert (q.float().abs().amax(-1)[[0, 1, 2, 4, 5, 6]] == 448).all()


def test_fp8_linear_is_the_product_of_dequantized_operands():
    torch.manual_seed(1)
    x, w = torch.randn(5, 64), torch.randn(48, 64)
    w_scale = w.abs().amax(1) / 448
    w_q = (w / w_scale[:, None]).to(E4M3)
    bias = torch.randn(48)
    x_q, x_scale = ref.quantize_fp8_per_token(x)
    want = (x_q.float() * x_scale) @ (w_q.float() * w_scale[:, None]).T + bias
    got = ref.fp8_linear(x, w_q, w_scale, None, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    static = torch.tensor([0.02])
    want = (nearest_e4m3((x / 0.02).clamp(-448, 448)) * 0.02) @ (w_q.float() *
                                                                   w_scale[:, None]).T
    torch.testing.assert_close(ref.fp8_linear(x, w_q, w_scale, static), want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [E4M3, torch.int8])
def test_kv_quantization_round_trip(dtype):
    torch.manual_seed(2)
    x = torch.randn(9, 3, 16) * torch.tensor([1.0, 4.0, 0.1])[None, :, None]
    qmax = 448 if dtype == E4M3 else 127
    scale = x.abs().amax(dim=(0, 2)) / qmax
    q = ref.quantize_kv(x, scale, dtype)
    assert q.dtype == dtype
    scaled = x / scale[None, :, None]
    want = nearest_e4m3(scaled) if dtype == E4M3 else scaled.round()
    assert torch.equal(q.float(), want)
    back = ref.dequantize_kv(q, scale, torch.float32)
    step = (2.0 ** -4 if dtype == E4M3 else 0.5 / 1.0)  # half a quantization step, relative
    bound = (x.abs() * step).clamp_min(0.5 * scale[None, :, None]) if dtype == E4M3 else \
        0.5 * scale[None, :, None].expand_as(x)
    assert ((back - x).abs() <= bound + 1e-7).all()


# ---- engines vs the simulation --------------------------------------------------------
SCHEMES = {  # name: (quantization, kv_cache_dtype, calibrated)
    "fp8": ("fp8", "auto", False),
    "fp8-kv": ("none", "fp8", False),
    "int8-kv": ("none", "int8", True),
    "fp8-static+fp8-kv": ("fp8", "fp8", True),
}
TOKENS = list(range(3, 120))


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    # Tiny models take the text's UTF-8 bytes as ids: every ASCII byte and multi-byte ones.
    path.write_bytes((bytes(range(3, 128)) + "éüñ漢字🙂".encode()) * 12)
    return path


def _scales_for_simulation(engine_dir, num_layers: int, calibrated: bool, kv: str):
    """The calibrated scales the engine stored, keyed as the simulation wants them."""
    state = load_file(str(engine_dir / "rank0.safetensors"))
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj",
                                                                           "up_proj")}
    inputs = {}
    for name, tensor in state.items():
        if name.endswith(".input_scale"):
            base = name.removesuffix(".input_scale")
            parent, leaf = base.rsplit(".", 1)
            for part in fused.get(leaf, (leaf,)):
                inputs[f"{parent}.{part}"] = tensor.item()
    kv_scales = None
    if calibrated and kv != "auto":
        kv_scales = {i: (state[f"model.layers.{i}.self_attn.attn.k_scale"],
                         state[f"model.layers.{i}.self_attn.attn.v_scale"])
                     for i in range(num_layers)}
    return inputs or None, kv_scales


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_quantized_engine_matches_its_simulation(scheme, tiny_checkpoints, tmp_path,
                                                 calib_text):
    """kiln's logits equal an independent float32 simulation of the scheme up to rounding
    flips: a value within float32 noise of a rounding midpoint (the two sides sum in
    different orders) can round the other way, which moves that element by a step (up to
    12.5% for e4m3) and every logit after it (a flip in K or V moves all later rows).
    Measured: without flips all logits within 2e-4 (mean 7e-7); static fp8 + fp8 KV has
    flips: mean 0.0025, max 0.13, against the scheme's own mean 0.069 / max 0.50 (logit
    std 0.8). A wrong scheme (scale, clamp, granularity) errs by as much as the scheme
    itself, so: mean within 10% of the scheme's mean error, max within half of its max."""
    quantization, kv, calibrated = SCHEMES[scheme]
    folder, hf_model = tiny_checkpoints["llama"]
    engine_dir = build(folder, tmp_path / "engine", BuildConfig(
        dtype="float32", max_seq_len=256, quantization=quantization, kv_cache_dtype=kv,
        calib_file=str(calib_text) if calibrated else None, calib_samples=4,
        calib_seq_len=128), progress=False)
    got = sequence_logits(LLM(engine_dir, device="cpu").engine, TOKENS)

    sim_model = copy.deepcopy(hf_model)
    if quantization == "fp8":
        fp8_weights(sim_model)
    inputs, kv_scales = _scales_for_simulation(engine_dir, 2, calibrated, kv)
    with torch.no_grad():
        plain = hf_model(torch.tensor([TOKENS])).logits[0]
        with simulate(sim_model, fp8=quantization == "fp8", input_scales=inputs,
                      kv=None if kv == "auto" else kv, kv_scales=kv_scales):
            want = sim_model(torch.tensor([TOKENS])).logits[0]
    scheme_error = (want - plain).abs().max().item()
    assert scheme_error > 0.01  # the simulation really quantizes
    diff = (got - want).abs()
    assert diff.mean().item() < 0.1 * (want - plain).abs().mean().item()
    assert diff.max().item() < 0.5 * scheme_error


@pytest.mark.parametrize("arch, head, calibrated", [
    ("llama", "auto", False), ("llama3-rope-tied", "auto", True),
    ("llama", "int8_wo", False)])
def test_fp8_lm_head_matches_its_simulation(arch, head, calibrated, tiny_checkpoints,
                                            tmp_path, calib_text):
    """--quantization fp8 --quantize-lm-head: the head in e4m3 per row with its input
    rounded per token (also with static input scales for the layers: the head's input is
    never calibrated), or in int8 per channel; a tied head is stored apart and the
    embedding stays float. Logits as the simulation's with the head rounded too."""
    folder, hf_model = tiny_checkpoints[arch]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(
        dtype="float32", max_seq_len=256, quantization="fp8", quantize_lm_head=head,
        calib_file=str(calib_text) if calibrated else None, calib_samples=4,
        calib_seq_len=128), progress=False)
    build_cfg = load_engine_config(engine_dir).build
    held = "fp8" if head == "auto" else head
    assert build_cfg.quantize_lm_head == held
    assert build_cfg.activation_scheme == ("static" if calibrated else "dynamic")
    state = load_file(str(engine_dir / "rank0.safetensors"))
    assert state["lm_head.weight"].dtype == (E4M3 if held == "fp8" else torch.int8)
    assert "lm_head.input_scale" not in state
    assert state["model.embed_tokens.weight"].dtype == torch.float32
    llm = LLM(engine_dir, device="cpu")
    assert llm.engine.runner.model.lm_head.method.name == held
    got = sequence_logits(llm.engine, TOKENS)

    sim = copy.deepcopy(hf_model)
    fp8_weights(sim)
    inputs, _ = _scales_for_simulation(engine_dir, 2, calibrated, "auto")
    with torch.no_grad():
        with simulate(sim, fp8=True, input_scales=inputs):
            body = sim(torch.tensor([TOKENS])).logits[0]
        sim.lm_head.weight = torch.nn.Parameter(sim.lm_head.weight.detach().clone())
        if held == "fp8":
            fp8_weights(sim, match="lm_head")
        else:
            from tests.fake_quant import int_weights

            int_weights(sim, 8, 0, match="lm_head")
        with simulate(sim, fp8=True, input_scales=inputs, fp8_head=held == "fp8"):
            want = sim(torch.tensor([TOKENS])).logits[0]
    head_error = (want - body).abs().max().item()
    assert head_error > 1e-3  # the head really is rounded
    diff = (got - want).abs()
    assert diff.mean().item() < 0.1 * (want - body).abs().mean().item()
    assert diff.max().item() < 0.5 * head_error
    embed = hf_model.get_input_embeddings().weight
    torch.testing.assert_close(llm.engine.runner.model.model.embed_tokens.weight, embed)


def test_fp8_engine_dir_holds_kernel_layout(tiny_checkpoints, tmp_path, calib_text,
                                            monkeypatch):
    folder, _ = tiny_checkpoints["llama"]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(
        dtype="float32", max_seq_len=256, quantization="fp8", kv_cache_dtype="int8",
        calib_file=str(calib_text), calib_samples=2), progress=False)
    cfg = load_engine_config(engine_dir).build
    assert (cfg.quantization, cfg.activation_scheme, cfg.kv_cache_dtype) == \
        ("fp8", "static", "int8")
    state = load_file(str(engine_dir / "rank0.safetensors"))
    qkv = "model.layers.0.self_attn.qkv_proj"
    assert state[f"{qkv}.weight"].dtype == E4M3
    assert state[f"{qkv}.weight_scale"].shape == (64 + 2 * 32,)
    assert state[f"{qkv}.input_scale"].shape == (1,)
    assert state["model.layers.1.self_attn.attn.k_scale"].shape == (2,)  # per KV head
    assert state["lm_head.weight"].dtype == torch.float32  # declared high precision
    assert state["model.embed_tokens.weight"].dtype == torch.float32
    # Loading converts nothing: the runner's parameters are the file's tensors.
    monkeypatch.setattr("kiln.layers.quantization.FP8Method.quantize_from_float",
                        lambda *a: pytest.fail("conversion at load"))
    llm = LLM(engine_dir, device="cpu")
    layer = llm.engine.runner.model.model.layers["0"].self_attn
    assert layer.qkv_proj.weight.dtype == E4M3 and layer.qkv_proj.method.name == "fp8"
    assert llm.engine.runner.kv_cache.dtype == torch.int8
    assert llm.engine.runner.kv_bytes_per_block() * 4 == \
        LLM(build(folder, tmp_path / "f32", BuildConfig(dtype="float32", max_seq_len=256),
                  progress=False), device="cpu").engine.runner.kv_bytes_per_block()


def test_one_byte_kv_cache_holds_more_tokens(tiny_checkpoints, tmp_path):
    folder, _ = tiny_checkpoints["llama"]
    budget = dict(device="cpu", cpu_kv_cache_bytes=1 << 20)
    plain = LLM(build(folder, tmp_path / "a", BuildConfig(dtype="float32", max_seq_len=256,
                                                          max_batch_size=4096),
                      progress=False), **budget)
    fp8 = LLM(build(folder, tmp_path / "b", BuildConfig(dtype="float32", max_seq_len=256,
                                                        max_batch_size=4096,
                                                        kv_cache_dtype="fp8"),
                    progress=False), **budget)
    assert fp8.engine.kv.num_blocks == 4 * plain.engine.kv.num_blocks


def test_llm_takes_build_options(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    folder, _ = tiny_checkpoints["llama"]
    llm = LLM(folder, dtype="float32", max_seq_len=256, quantization="fp8",
              kv_cache_dtype="fp8", device="cpu")
    assert llm.engine.config.build.quantization == "fp8"
    assert llm.engine.runner.kv_cache.dtype == E4M3
    out = llm.generate([5, 6, 7])[0]
    assert len(out.token_ids) > 0


# ---- bad input ------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(quantization="int3"), "--quantization 'int3' is not one of"),
    (dict(kv_cache_dtype="fp4"), "--kv-cache-dtype 'fp4' is not one of"),
    (dict(kv_cache_dtype="int8"), "int8 needs per-head scales from calibration"),
    (dict(quantization="fp8", activation_scheme="static"), "needs calibration"),
    (dict(calib_file="/nonexistent/calib.txt", quantization="fp8"), "does not exist"),
])
def test_bad_quantization_options_fail_at_build(options, message, tiny_checkpoints, tmp_path):
    folder, _ = tiny_checkpoints["llama"]
    with pytest.raises(BuildError, match=message):
        build(folder, tmp_path / "e", BuildConfig(dtype="float32", **options), progress=False)
    assert not (tmp_path / "e").exists()


def test_cli_bad_quantization_is_one_line(tiny_checkpoints, tmp_path):
    folder, _ = tiny_checkpoints["llama"]
    result = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "build", str(folder), "-o", str(tmp_path / "e"),
         "--kv-cache-dtype", "int8"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("kiln: error: --kv-cache-dtype int8 needs")
    assert "Traceback" not in result.stderr


def test_fp8_on_a_card_without_fp8_is_refused(monkeypatch):
    from kiln.runtime import weights

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(KilnError, match=r"NVIDIA A100 \(sm_80\) cannot run; FP8 needs"):
        weights.check_fp8_support("fp8", "auto", torch.device("cuda", 0))
    with pytest.raises(KilnError, match="KV cache"):
        weights.check_fp8_support("none", "fp8", torch.device("cuda", 0))
    weights.check_fp8_support("none", "int8", torch.device("cuda", 0))  # int8 is fine


def test_calibration_reads_unquantized_linear_inputs():
    """On a GPU the norm before an FP8 layer hands it an FP8Act (its input quantized in
    the norm's kernel); calibrating a pre-quantized FP8 checkpoint (for KV scales) reads
    every linear's input as a tensor, so calibrate() runs with that fusion off."""
    from kiln.build.calibrate import calibrate
    from kiln.layers.quantization import FP8Method, unfused_inputs

    method = FP8Method()
    assert method.input_quant(None) is not None
    with unfused_inputs():
        assert method.input_quant(None) is None
    seen = []

    class Probe(torch.nn.Module):  # what an FP8 layer's input_quant says during the forward
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, positions):
            seen.append(method.input_quant(None))

    calibrate(Probe(), [[1, 2, 3]], torch.device("cpu"), progress=False)
    assert seen == [None] and method.input_quant(None) is not None


def test_calibration_text_that_is_not_text_or_not_the_models_script(tmp_path, caplog):
    """A binary file given as --calib-file is refused in one line (it decoded with
    replacement characters and calibrated on their tokens); text the tokenizer cannot
    read (mostly its unknown token) calibrates with a warning that says so."""
    from kiln.build.calibrate import calibration_samples
    from kiln.checkpoint import open_checkpoint
    from tests.quant_checkpoints import tiny_llama, tiny_tokenizer

    folder = tiny_llama(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(folder)  # word-level "t0".."t255", unknown "t0"
    ckpt = open_checkpoint(folder)
    binary = tmp_path / "model.bin"
    binary.write_bytes(torch.randint(128, 256, (4000,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(BuildError, match=r"model.bin is not UTF-8 text \(\d+% of it does not "
                                         r"decode\); give a plain text file"):
        calibration_samples(ckpt, str(binary), 4, 64, 256)
    known = tmp_path / "known.txt"
    known.write_text(" ".join(f"t{i % 7 + 3}" for i in range(300)))  # (not t1..: "t1" is BOS)
    with caplog.at_level("WARNING", logger="kiln.build.calibrate"):
        samples = calibration_samples(ckpt, str(known), 4, 64, 256)
    assert len(samples) == 4 and not caplog.records
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("Le renard brun saute par-dessus le chien paresseux. " * 20)
    with caplog.at_level("WARNING", logger="kiln.build.calibrate"):
        calibration_samples(ckpt, str(foreign), 4, 64, 256)
    assert len(caplog.records) == 1 and "100% of calibration file" in caplog.text and \
        "are the unknown token" in caplog.text, caplog.text
