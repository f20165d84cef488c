"""Weight-only INT8 / INT4 engines (kiln/layers/weight_only.py): the storage against its
definition, engines against an independent simulation on transformers, the engine dir,
and bad input. The Triton kernels are in tests/test_kernels_int.py."""

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
from kiln.errors import BuildError
from kiln.eval import sequence_logits
from kiln.kernels import reference as ref
from kiln.layers.weight_only import quantize_int4_asymmetric, quantize_int8_symmetric
from tests.fake_quant import int_weights

TOKENS = list(range(3, 120))


# ---- storage and quantizers vs their definitions -----------------------------------------
def test_int4_packing_puts_even_inputs_in_the_low_nibble():
    q = torch.tensor([[1, 2, 15, 0, 7, 9]], dtype=torch.uint8)
    packed = ref.pack_int4(q)
    assert packed.tolist() == [[1 + 16 * 2, 15, 7 + 16 * 9]]
    torch.manual_seed(0)
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(ref.unpack_int4(ref.pack_int4(q)), q)


def test_dequantization_is_q_times_scale_plus_offset_per_group():
    torch.manual_seed(1)
    q = torch.randint(0, 16, (3, 8), dtype=torch.uint8)
    scale, offset = torch.rand(3, 2), torch.randn(3, 2)
    want = torch.empty(3, 8)
    for n in range(3):
        for k in range(8):
            want[n, k] = q[n, k].item() * scale[n, k // 4] + offset[n, k // 4]
    assert torch.equal(ref.dequantize_int_weight(ref.pack_int4(q), scale, offset), want)
    q8 = torch.randint(-127, 128, (3, 8), dtype=torch.int8)
    assert torch.equal(ref.dequantize_int_weight(q8, scale[:, :1], None),
                       q8.float() * scale[:, :1])


@pytest.mark.parametrize("group", [0, 16])
def test_int8_symmetric_rounds_to_the_nearest_step(group):
    torch.manual_seed(2)
    w = torch.randn(6, 48) * torch.tensor([1e-3, 1, 10, 1, 1, 0.1])[:, None]
    q, scale = quantize_int8_symmetric(w, group)
    size = group or 48
    assert q.dtype == torch.int8 and scale.shape == (6, 48 // size)
    assert torch.equal(scale, w.view(6, -1, size).abs().amax(-1) / 127)
    back = ref.dequantize_int_weight(q, scale, None).view(6, -1, size)
    assert ((back - w.view(6, -1, size)).abs() <= scale[:, :, None] * 0.5001).all()
    assert (q.abs().view(6, -1, size).amax(-1) == 127).all()  # the group's max uses 127


def test_int4_asymmetric_spans_min_to_max():
    torch.manual_seed(3)
    w = torch.randn(4, 64) + torch.tensor([0.0, 3.0, -2.0, 0.0])[:, None]  # off-centre rows
    q, scale, offset = quantize_int4_asymmetric(w, 32)
    groups = w.view(4, 2, 32)
    assert torch.equal(offset, groups.amin(-1))
    torch.testing.assert_close(scale, (groups.amax(-1) - groups.amin(-1)) / 15)
    assert int(q.min()) == 0 and int(q.max()) == 15
    back = ref.dequantize_int_weight(ref.pack_int4(q), scale, offset).view(4, 2, 32)
    assert ((back - groups).abs() <= scale[:, :, None] * 0.5001).all()


# ---- engines vs the simulation ------------------------------------------------------------
@pytest.mark.parametrize("arch, quantization, group", [
    ("llama", "int8_wo", 0), ("llama", "int4_wo", 32), ("starcoder2", "int4_wo", 64)])
def test_weight_only_engine_matches_its_simulation(arch, quantization, group,
                                                   tiny_checkpoints, tmp_path):
    """The weights are rounded from the same float32 values by the same definition, so
    kiln's logits equal the simulation's up to float32 sums (no rounding flips), far
    closer than the scheme's own error."""
    folder, hf_model = tiny_checkpoints[arch]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(
        dtype="float32", max_seq_len=256, quantization=quantization, group_size=group),
        progress=False)
    got = sequence_logits(LLM(engine_dir, device="cpu").engine, TOKENS)
    sim = copy.deepcopy(hf_model)
    int_weights(sim, 8 if quantization == "int8_wo" else 4, group)
    with torch.no_grad():
        plain = hf_model(torch.tensor([TOKENS])).logits[0]
        want = sim(torch.tensor([TOKENS])).logits[0]
    scheme_error = (want - plain).abs().max().item()
    assert scheme_error > 1e-3  # the simulation really quantizes
    assert (got - want).abs().max().item() < 1e-3 * max(1.0, scheme_error)


@pytest.mark.parametrize("arch, quantization, group, head", [
    ("llama", "int4_wo", 32, "auto"), ("qwen2", "int8_wo", 0, "auto"),
    ("llama3-rope-tied", "int4_wo", 64, "auto"), ("llama3-rope-tied", "int4_wo", 64, "int8_wo")])
def test_quantized_lm_head_matches_its_simulation(arch, quantization, group, head,
                                                  tiny_checkpoints, tmp_path):
    """--quantize-lm-head: the head rounded as the projections are, or in int8 per
    channel under int4 layers (qwen2 and llama3-rope-tied tie it to the embedding, which
    stays float: the engine stores the rounded head apart and loads it untied), so the
    logits equal the simulation's with the head rounded too; stored in the kernels'
    layout, its method recorded in engine.json."""
    folder, hf_model = tiny_checkpoints[arch]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(
        dtype="float32", max_seq_len=256, quantization=quantization, group_size=group,
        quantize_lm_head=head), progress=False)
    held = quantization if head == "auto" else head
    assert load_engine_config(engine_dir).build.quantize_lm_head == held
    state = load_file(str(engine_dir / "rank0.safetensors"))
    bits, head_group = (8, 0) if held == "int8_wo" else (4, group)
    assert state["lm_head.weight"].dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert state["lm_head.weight_scale"].shape == (256, 64 // (head_group or 64))
    assert state["model.embed_tokens.weight"].dtype == torch.float32
    llm = LLM(engine_dir, device="cpu")
    layer = llm.engine.runner.model.lm_head
    assert layer.method.name == held
    assert layer.weight is not llm.engine.runner.model.model.embed_tokens.weight
    got = sequence_logits(llm.engine, TOKENS)
    sim = copy.deepcopy(hf_model)
    int_weights(sim, 8 if quantization == "int8_wo" else 4, group)
    with torch.no_grad():
        body = sim(torch.tensor([TOKENS])).logits[0]
        sim.lm_head.weight = torch.nn.Parameter(sim.lm_head.weight.detach().clone())
        int_weights(sim, bits, head_group, match="lm_head")  # untied: the embedding stays
        want = sim(torch.tensor([TOKENS])).logits[0]
    head_error = (want - body).abs().max().item()
    assert head_error > 1e-3  # the head really is rounded
    assert (got - want).abs().max().item() < 1e-3 * max(1.0, head_error)
    # the embedding is untouched: the tied model still embeds with the float weights
    embed = hf_model.get_input_embeddings().weight
    torch.testing.assert_close(llm.engine.runner.model.model.embed_tokens.weight, embed)


def test_int4_engine_dir_holds_kernel_layout(tiny_checkpoints, tmp_path, monkeypatch):
    folder, _ = tiny_checkpoints["llama"]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(
        dtype="float32", max_seq_len=256, quantization="int4_wo", group_size=32),
        progress=False)
    cfg = load_engine_config(engine_dir).build
    assert (cfg.quantization, cfg.group_size, cfg.quant_source) == ("int4_wo", 32, "kiln")
    state = load_file(str(engine_dir / "rank0.safetensors"))
    down = "model.layers.0.mlp.down_proj"  # in 128, out 64
    assert state[f"{down}.weight"].dtype == torch.uint8
    assert state[f"{down}.weight"].shape == (64, 64)
    assert state[f"{down}.weight_scale"].shape == (64, 4)
    assert state[f"{down}.weight_offset"].shape == (64, 4)
    assert state["lm_head.weight"].dtype == torch.float32  # declared high precision
    monkeypatch.setattr("kiln.layers.weight_only.IntWeightMethod.quantize_from_float",
                        lambda *a: pytest.fail("conversion at load"))
    llm = LLM(engine_dir, device="cpu")
    layer = llm.engine.runner.model.model.layers["0"].mlp.down_proj
    assert layer.weight.dtype == torch.uint8 and layer.method.name == "int4_wo"


def test_int8_default_is_per_channel_and_llm_takes_the_options(tiny_checkpoints, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    folder, _ = tiny_checkpoints["llama"]
    llm = LLM(folder, dtype="float32", max_seq_len=256, quantization="int8_wo", device="cpu")
    build_cfg = llm.engine.config.build
    assert (build_cfg.quantization, build_cfg.group_size) == ("int8_wo", 0)
    qkv = llm.engine.runner.model.model.layers["0"].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.int8 and qkv.weight_scale.shape == (128, 1)
    assert len(llm.generate([5, 6, 7])[0].token_ids) > 0


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(quantization="int4_wo", group_size=48), r"--group-size 48 does not divide the "
     r"model's hidden size .* 64: the group size must be a positive even number that "
     r"divides every layer's inputs; try --group-size 64"),
    (dict(quantization="int4_wo"), r"int4 groups of 128 inputs \(the default: --group-size "
     r"not given, or 0\) do not divide the model's hidden size .* 64; give --group-size, a "
     r"positive even number that divides every layer's inputs \(e.g. 64\)"),
    (dict(quantization="int4_wo", group_size=7), "must be a positive even number"),
])
def test_bad_group_size_fails_at_build(options, message, tiny_checkpoints, tmp_path):
    folder, _ = tiny_checkpoints["llama"]
    with pytest.raises(BuildError, match=message):
        build(folder, tmp_path / "e", BuildConfig(dtype="float32", **options), progress=False)


@pytest.mark.parametrize("options, held", [
    (dict(quantization="int8_sq"), "--quantization int8_sq has none"),
    (dict(), "--quantization none has none")])
def test_quantize_lm_head_needs_a_method_that_holds_it(options, held, tiny_checkpoints,
                                                       tmp_path):
    folder, _ = tiny_checkpoints["llama"]
    with pytest.raises(BuildError, match="--quantize-lm-head rounds the LM head with kiln's "
                       fr"own methods \(--quantization fp8, int8_wo, .*\); {held}"):
        build(folder, tmp_path / "e", BuildConfig(dtype="float32", quantize_lm_head="auto",
                                                  **options), progress=False)


def test_cli_bad_group_size_is_one_line(tiny_checkpoints, tmp_path):
    folder, _ = tiny_checkpoints["llama"]
    result = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "build", str(folder), "-o", str(tmp_path / "e"),
         "--quantization", "int4_wo", "--group-size", "96"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("kiln: error: --group-size 96 does not divide")
    assert "Traceback" not in result.stderr


# ---- GPU --------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantization, group, switch", [
    ("int4_wo", 32, None), ("int8_wo", 0, None), ("int8_sq", 0, None),
    ("int4_wo", 32, "KILN_INT_DIGITS"), ("int8_wo", 0, "KILN_INT_DIGITS"),
    ("int4_wo", 32, "KILN_INT_SWAP"), ("int8_wo", 0, "KILN_INT_SWAP"),
    ("int4_wo", 32, "head"), ("int8_wo", 0, "head")])
def test_gpu_engine_matches_the_cpu_engine(quantization, group, switch, tiny_checkpoints,
                                           tmp_path, monkeypatch):
    """The same float32 engine dir on both devices: Triton int GEMMs (GEMV and tl.dot
    paths, in CUDA graphs for decode; KILN_INT_DIGITS=1: the integer products on x's digit
    planes; KILN_INT_SWAP=1: decode-batch tiles transposed; head: the LM head quantized
    too) / torch._int_mm against the CPU reference."""
    from kiln import SamplingParams

    for name in ("KILN_INT_DIGITS", "KILN_INT_SWAP"):
        monkeypatch.setenv(name, "1" if name == switch else "0")
    folder, _ = tiny_checkpoints["llama"]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(
        dtype="float32", max_seq_len=256, quantization=quantization, group_size=group,
        quantize_lm_head="auto" if switch == "head" else ""), progress=False)
    cpu, gpu = LLM(engine_dir, device="cpu"), LLM(engine_dir, device="cuda")
    want = sequence_logits(cpu.engine, TOKENS)
    got = sequence_logits(gpu.engine, TOKENS).cpu()
    assert (got - want).abs().mean().item() < 1e-3
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(10, 40))]
    assert [o.token_ids for o in gpu.generate(prompts, params)] == \
        [o.token_ids for o in cpu.generate(prompts, params)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_magic_int4_tiles_match_the_float_tiles(tiny_checkpoints, tmp_path, monkeypatch):
    """A bfloat16 int4 engine (groups of 64): the decode-batch tiles unpacked by bit
    operations (IntGemmConfig.magic, transposed; forced through KILN_INT_TILES since the
    default takes them for groups of 128) against the float tiles (KILN_INT_MAGIC=0), both
    against the CPU engine: a 48-token prompt's logits (48 rows: the decode-batch tiles)
    and a batch's greedy tokens (2 rows a decode step, in CUDA graphs)."""
    from kiln import SamplingParams

    folder, _ = tiny_checkpoints["llama"]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(
        dtype="bfloat16", max_seq_len=256, quantization="int4_wo", group_size=64),
        progress=False)
    tokens = TOKENS[:48]
    want = sequence_logits(LLM(engine_dir, device="cpu").engine, tokens).float()
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(10, 40))]
    err, outs = {}, {}
    for name, env in (("float", {"KILN_INT_MAGIC": "0"}),
                      ("magic", {"KILN_INT_TILES": "64,64,4,3,1,0,0,0,0,1,1"})):
        for key in ("KILN_INT_MAGIC", "KILN_INT_TILES"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        gpu = LLM(engine_dir, device="cuda")
        got = sequence_logits(gpu.engine, tokens).float().cpu()
        err[name] = (got - want).abs().mean().item()
        outs[name] = [o.token_ids for o in gpu.generate(prompts, params)]
        del gpu
    # exact integers and float32 scales: no further from the CPU engine than the float
    # tiles, which round each dequantized weight to bfloat16
    assert err["magic"] <= 1.5 * err["float"] + 1e-3, err
    assert all(len(o) == 12 for o in outs["magic"])
