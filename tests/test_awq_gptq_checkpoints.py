"""AutoAWQ (GEMM) and GPTQ (v1) checkpoints: fixtures written here from the formats'
documented packing (see kiln/build/packed_int.py), read by kiln into its int4 storage,
against the float model holding w = (q - zero) * scale."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kiln import LLM
from kiln.build import build, load_engine_config
from kiln.config import BuildConfig
from kiln.errors import CheckpointError
from kiln.eval import sequence_logits

TOKENS = list(range(3, 60))
GROUP = 32
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _pack_words(values: torch.Tensor, order: list[int] | None = None) -> torch.Tensor:
    """[rows, 8w] 0..15 -> int32 [rows, w]; nibble i of word c holds column
    8c + order[i] (order: identity unless given)."""
    order = order or list(range(8))
    v = values.to(torch.int64).view(values.shape[0], -1, 8)
    words = torch.zeros(v.shape[:2], dtype=torch.int64)
    for i in range(8):
        words |= v[:, :, order[i]] << (4 * i)
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)


def _write(hf_model, folder, fmt: str, extra_config: dict | None = None, group: int = GROUP,
           skip: tuple[str, ...] = (), shuffle_g_idx: bool = False):
    """Quantize every decoder projection (4-bit, groups of `group` inputs (0: one group a
    row, group_size -1), zero points) and save it in `fmt` ("awq" or "gptq"), the
    projections named in `skip` in float; return {projection name: dequantized weight}.
    shuffle_g_idx: GPTQ's g_idx (and the groups) in act-order, not arange(in) // group."""
    torch.manual_seed(3)
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    dequantized = {}
    for name in [k for k in state if ".layers." in k and k.endswith("proj.weight")]:
        if any(f".{s}." in name for s in skip):
            continue
        w = state.pop(name).float()
        out, inp = w.shape
        size = group or inp
        groups = w.view(out, inp // size, size)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp_min(1e-5).half()
        # any zero point the format can hold (GPTQ v1 stores zero - 1 in 4 bits: 1..16;
        # 16 reads back as 15 + 1 = 16, which the values 0..15 never meet: use 1..15)
        zero = torch.randint(0 if fmt == "awq" else 1, 16, scale.shape)
        q = torch.randint(0, 16, (out, inp))
        g_idx = torch.arange(inp) // size
        if shuffle_g_idx:
            g_idx = g_idx[torch.randperm(inp)]
        dequantized[name] = (q - zero[:, g_idx]).float() * scale.float()[:, g_idx]
        prefix = name.removesuffix(".weight")
        if fmt == "awq":
            state[f"{prefix}.qweight"] = _pack_words(q.T.contiguous(), AWQ_ORDER)  # [in, out/8]
            state[f"{prefix}.qzeros"] = _pack_words(zero.T.contiguous(), AWQ_ORDER)
        else:
            state[f"{prefix}.qweight"] = _pack_words(q.contiguous()).T.contiguous()  # [in/8, out]
            state[f"{prefix}.qzeros"] = _pack_words((zero - 1).T.contiguous())
            state[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
        state[f"{prefix}.scales"] = scale.T.contiguous()  # [groups, out] fp16
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    config = hf_model.config.to_dict()
    config["quantization_config"] = {"awq": dict(quant_method="awq", bits=4,
                                                 group_size=group or -1, zero_point=True,
                                                 version="gemm"),
                                     "gptq": dict(quant_method="gptq", bits=4,
                                                  group_size=group or -1, desc_act=False,
                                                  sym=False, checkpoint_format="gptq")}[fmt]
    config["quantization_config"].update(extra_config or {})
    (folder / "config.json").write_text(json.dumps(config))
    return dequantized


def _against_dequantized(hf_model, dequantized, engine_dir) -> None:
    """The engine's logits equal the float model holding the dequantized weights."""
    import copy

    got = sequence_logits(LLM(engine_dir, device="cpu").engine, TOKENS)
    reference = copy.deepcopy(hf_model)
    state = reference.state_dict()
    state.update(dequantized)
    reference.load_state_dict(state)
    with torch.no_grad():
        want = reference(torch.tensor([TOKENS])).logits[0]
    # kiln computes q * s - zero * s, the reference (q - zero) * s: float32 roundings
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_packed_checkpoint_matches_its_dequantized_weights(fmt, tiny_checkpoints, tmp_path):
    _, hf_model = tiny_checkpoints["llama"]
    dequantized = _write(hf_model, tmp_path / fmt, fmt)
    engine_dir = build(tmp_path / fmt, tmp_path / "e", BuildConfig(dtype="float32",
                                                                    max_seq_len=256),
                       progress=False)
    cfg = load_engine_config(engine_dir).build
    assert (cfg.quantization, cfg.group_size, cfg.quant_source) == ("int4_wo", GROUP, fmt)
    _against_dequantized(hf_model, dequantized, engine_dir)


@pytest.mark.parametrize("fmt, extra, message", [
    ("gptq", dict(desc_act=True), "desc_act puts inputs in groups out of order"),
    ("gptq", dict(checkpoint_format="gptq_v2"), "checkpoint_format 'gptq_v2'"),
    ("awq", dict(version="gemv"), "AutoAWQ packing version='gemv'"),
    ("awq", dict(bits=3), "kiln reads 4-bit weights in groups"),
])
def test_unknown_packing_is_one_line(fmt, extra, message, tiny_checkpoints, tmp_path):
    _, hf_model = tiny_checkpoints["llama"]
    _write(hf_model, tmp_path / fmt, fmt, extra)
    with pytest.raises(CheckpointError, match=message):
        build(tmp_path / fmt, tmp_path / "e", BuildConfig(dtype="float32"), progress=False)


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
@pytest.mark.parametrize("case", ["float down_proj", "per channel", "string fields"])
def test_float_layers_per_channel_and_string_fields(case, fmt, tiny_checkpoints, tmp_path):
    """A projection saved in float (AutoAWQ's modules_to_not_convert) is held in float;
    group_size -1 (a group a row) is kiln's per-channel storage; numeric strings in
    quantization_config read as numbers."""
    _, hf_model = tiny_checkpoints["llama"]
    kwargs = {"float down_proj": dict(skip=("layers.1.mlp.down_proj",), extra_config=dict(
                  modules_to_not_convert=["layers.1.mlp.down_proj"])),
              "per channel": dict(group=0),
              "string fields": dict(extra_config=dict(bits="4", group_size=str(GROUP)))}[case]
    dequantized = _write(hf_model, tmp_path / fmt, fmt, **kwargs)
    engine_dir = build(tmp_path / fmt, tmp_path / "e", BuildConfig(dtype="float32",
                                                                    max_seq_len=256),
                       progress=False)
    cfg = load_engine_config(engine_dir).build
    assert cfg.group_size == (0 if case == "per channel" else GROUP)
    float_layers = ["model.layers.1.mlp.down_proj"] if case == "float down_proj" else []
    assert list(cfg.quant_ignore) == float_layers
    _against_dequantized(hf_model, dequantized, engine_dir)


@pytest.mark.parametrize("fmt, kwargs, message", [
    # act-order groups whatever the config says (desc_act False, or absent)
    ("gptq", dict(shuffle_g_idx=True), r"unsupported GPTQ checkpoint: model\.layers\.0\."
     r".*\.g_idx puts inputs in groups out of order \(act-order, desc_act\).*desc_act=False"),
    ("gptq", dict(shuffle_g_idx=True, extra_config=dict(desc_act=None)),
     "g_idx puts inputs in groups out of order"),
    ("gptq", dict(extra_config=dict(group_size=64)),
     r"down_proj: the scales imply group size 32 \(128 inputs / 4 scales a row\), "
     "quantization_config says 64"),
    ("awq", dict(extra_config=dict(group_size=16)),
     "the scales imply group size 32 .* quantization_config says 16"),
    ("gptq", dict(group=0, extra_config=dict(group_size=32)),
     "the scales imply group size 128 .* quantization_config says 32"),
    ("awq", dict(extra_config=dict(group_size=-1)),
     "the scales imply group size 32 .* quantization_config says per channel"),
    ("gptq", dict(extra_config=dict(bits="four")), "quantization_config bits is 'four'; "
     "expected an integer"),
    ("awq", dict(extra_config=dict(group_size=0)), r"4-bit weights in groups \(group_size > 0\)"
     r" or per channel \(-1\)"),
    ("awq", dict(skip=("layers.0.self_attn.k_proj",)),
     "quantizes only some of the projections kiln fuses in model.layers.0.self_attn.qkv_proj"),
])
def test_checkpoint_that_disagrees_with_itself_is_one_line(fmt, kwargs, message,
                                                           tiny_checkpoints, tmp_path):
    _, hf_model = tiny_checkpoints["llama"]
    _write(hf_model, tmp_path / fmt, fmt, **kwargs)
    with pytest.raises(CheckpointError, match=message):
        build(tmp_path / fmt, tmp_path / "e", BuildConfig(dtype="float32"), progress=False)


@pytest.mark.parametrize("option", [dict(group_size=32), dict(act_order=True),
                                    dict(smooth_alpha=0.7)])
def test_options_of_kilns_own_quantization_are_refused(option, tiny_checkpoints, tmp_path):
    """The checkpoint's weights are already rounded: --group-size, --act-order and
    --smooth-alpha would change nothing (they were accepted and ignored)."""
    from kiln.errors import BuildError

    _, hf_model = tiny_checkpoints["llama"]
    _write(hf_model, tmp_path / "awq", "awq")
    flag = "--" + next(iter(option)).replace("_", "-")
    with pytest.raises(BuildError, match=rf"awq is already quantized \(awq, int4_wo\): {flag} "
                       "applies when kiln quantizes float weights; drop it"):
        build(tmp_path / "awq", tmp_path / "e", BuildConfig(dtype="float32", **option),
              progress=False)
