"""Pre-quantized integer-weight checkpoints (kiln/build/packed_int.py): compressed-tensors
pack-quantized W4A16 made by llm-compressor's GPTQModifier, read into kiln's int4
storage; kiln against transformers on the same checkpoint (symmetric), and against the
format's documented dequantization w = (q - zero) * scale (asymmetric, which this
transformers cannot load: it expects unpacked zero points)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kiln import LLM
from kiln.build import build, load_engine_config
from kiln.build.packed_int import unpack_int32
from kiln.config import BuildConfig
from kiln.errors import CheckpointError
from kiln.eval import sequence_logits
from tests import quant_checkpoints as qc

pytest.importorskip("llmcompressor")
IDS = qc.calibration_ids(1, 40, 256, seed=7)[0]


def test_unpack_follows_the_packing_formula():
    torch.manual_seed(0)
    values = torch.randint(0, 16, (3, 24))
    words = torch.zeros(3, 3, dtype=torch.int64)
    for i in range(24):  # element i in bits 4 (i % 8) of word i // 8
        words[:, i // 8] |= values[:, i] << (4 * (i % 8))
    packed = (words - (words >= 2**31).long() * 2**32).to(torch.int32)  # as int32
    assert torch.equal(unpack_int32(packed, 4, 24), values.to(torch.int32))
    values8 = torch.randint(0, 256, (2, 8))
    words8 = torch.zeros(2, 2, dtype=torch.int64)
    for i in range(8):
        words8[:, i // 4] |= values8[:, i] << (8 * (i % 4))
    packed8 = (words8 - (words8 >= 2**31).long() * 2**32).to(torch.int32)
    assert torch.equal(unpack_int32(packed8, 8, 8), values8.to(torch.int32))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct-int")
    src = qc.tiny_llama(root / "float")
    out = {sym: qc.compressed_tensors_int_weights(src, root / f"w4a16-{sym}", symmetric=sym)
           for sym in (True, False)}
    out["w8a8"] = qc.compressed_tensors_w8a8(src, root / "w8a8")
    return out


def _kiln_logits(path, tmp_path):
    engine_dir = build(path, tmp_path / "e", BuildConfig(dtype="float32", max_seq_len=256),
                       progress=False)
    return engine_dir, sequence_logits(LLM(engine_dir, device="cpu").engine, IDS.tolist())


def test_w4a16_symmetric_matches_transformers(checkpoints, tmp_path):
    """The same dequantized weights up to one float32 rounding (kiln: q * s + offset,
    transformers: (q - zero) * s): measured max |diff| 2.6e-6 for logits up to 3."""
    engine_dir, got = _kiln_logits(checkpoints[True], tmp_path)
    want = qc.reference_logits(checkpoints[True], IDS)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
    assert got[-8:].argmax(-1).tolist() == want[-8:].argmax(-1).tolist()
    cfg = load_engine_config(engine_dir).build
    assert (cfg.quantization, cfg.group_size, cfg.quant_source) == (
        "int4_wo", 32, "compressed-tensors")
    state = load_file(str(engine_dir / "rank0.safetensors"))
    assert state["model.layers.0.mlp.down_proj.weight"].dtype == torch.uint8
    assert state["lm_head.weight"].dtype == torch.float32  # llm-compressor ignored it


def _dequantized_by_the_format(path):
    """transformers' float model with every packed weight replaced by (q - zero) * scale,
    unpacked here from the format's definition."""
    import transformers

    state = load_file(str(path / "model.safetensors"))
    config = transformers.AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = transformers.LlamaForCausalLM(config).eval()
    float_state = {k: v for k, v in state.items() if not k.rsplit(".", 1)[1].startswith(
        ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"))}
    for name in [k for k in state if k.endswith(".weight_packed")]:
        prefix = name.removesuffix(".weight_packed")
        rows, cols = state[f"{prefix}.weight_shape"].tolist()
        scale = state[f"{prefix}.weight_scale"].float()
        words = state[name].to(torch.int64) % 2**32
        q = torch.stack([(words >> (4 * e)) & 15 for e in range(8)], -1).reshape(rows, cols) - 8
        zwords = state[f"{prefix}.weight_zero_point"].to(torch.int64) % 2**32  # [rows/8, g]
        zero = torch.stack([(zwords >> (4 * e)) & 15 for e in range(8)], 1).reshape(
            rows, -1) - 8
        group = cols // scale.shape[1]
        w = (q - zero.repeat_interleave(group, 1)).double() * scale.double().repeat_interleave(
            group, 1)
        float_state[f"{prefix}.weight"] = w.float()
    model.load_state_dict(float_state, strict=True)
    return model


def test_w4a16_asymmetric_matches_the_format_definition(checkpoints, tmp_path):
    _, got = _kiln_logits(checkpoints[False], tmp_path)
    with torch.no_grad():
        want = _dequantized_by_the_format(checkpoints[False])(IDS[None]).logits[0]
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("change, message", [
    (dict(actorder="group"), "actorder 'group' permutes groups"),
    (dict(num_bits=3), "kiln reads 4- and 8-bit integer weights"),
])
def test_unknown_packing_is_one_line(change, message, checkpoints, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoints[True], path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(change)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        build(path, tmp_path / "e", BuildConfig(dtype="float32"), progress=False)


@pytest.mark.parametrize("change", ["g_idx in order", "g_idx shuffled", "group_size 64"])
def test_tensors_that_contradict_the_packing_are_one_line(change, checkpoints, tmp_path):
    """weight_g_idx (llm-compressor's actorder "group") is read, not dropped: in order it
    changes nothing, out of order kiln cannot hold it; the scales' group count must be the
    config's group size."""
    from safetensors.torch import save_file

    path = tmp_path / "ckpt"
    shutil.copytree(checkpoints[True], path)
    if change == "group_size 64":
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64
        (path / "config.json").write_text(json.dumps(config))
    else:
        state = load_file(str(path / "model.safetensors"))
        g_idx = torch.arange(128, dtype=torch.int32) // 32
        if change == "g_idx shuffled":
            g_idx = g_idx[torch.randperm(128, generator=torch.Generator().manual_seed(0))]
        state["model.layers.1.mlp.down_proj.weight_g_idx"] = g_idx
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    if change == "g_idx in order":
        assert _kiln_logits(path, tmp_path)[1].isfinite().all()
        return
    message = {"g_idx shuffled": r"model\.layers\.1\.mlp\.down_proj\.weight_g_idx puts "
               r"inputs in groups out of order \(act-order, desc_act\)",
               "group_size 64": r"the scales imply group size 32 \(128 inputs / 4 scales a "
               r"row\), quantization_config says 64"}[change]
    with pytest.raises(CheckpointError, match=message):
        build(path, tmp_path / "e", BuildConfig(dtype="float32"), progress=False)


def test_w8a8_int_quantized_runs_as_int8_sq(checkpoints, tmp_path):
    """kiln's int8_sq engine on the checkpoint's own int8 weights and scales equals the
    scheme computed from its definition (per-token int8 inputs, scale max|x| / 127, exact
    integer sums): measured max |diff| 1.2e-6. transformers' compressed-tensors path
    scales inputs by max|x| / 127.5 over [-128, 127] instead, which moves logits by up to
    ~0.1 (of 3) on this random model, and flips a near-tie argmax at 1 of 40 positions;
    so against transformers: within 10% of the largest logit, 90% of argmaxes equal."""
    from tests.fake_quant import simulate

    path = checkpoints["w8a8"]
    engine_dir, got = _kiln_logits(path, tmp_path)
    assert load_engine_config(engine_dir).build.quantization == "int8_sq"
    state = load_file(str(path / "model.safetensors"))
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = transformers.LlamaForCausalLM(config).eval()
    float_state = {k: v for k, v in state.items() if not k.endswith(".weight_scale")}
    for name in [k for k in state if k.endswith(".weight_scale")]:
        prefix = name.removesuffix(".weight_scale")
        float_state[f"{prefix}.weight"] = state[f"{prefix}.weight"].float() * state[name]
    model.load_state_dict(float_state, strict=True)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.int8_values = state[f"{name}.weight"].float()
            module.int8_scale = state[f"{name}.weight_scale"].float()[:, 0]
    with torch.no_grad():
        plain = model(IDS[None]).logits[0]
        with simulate(model, int8=True):
            want = model(IDS[None]).logits[0]
    assert (want - plain).abs().max().item() > 0.01  # inputs really are quantized
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
    reference = qc.reference_logits(path, IDS)
    assert (got - reference).abs().max().item() < 0.1 * reference.abs().max().item()
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean().item() >= 0.9
