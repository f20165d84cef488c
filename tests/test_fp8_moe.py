"""FP8 mixture-of-experts engines (CPU): experts in e4m3 with per-row scales, from
`--quantization fp8` on a float checkpoint and from llm-compressor's FP8 checkpoints of
an MoE model (each expert projection a quantized linear, as published FP8 Mixtral and
Qwen-MoE checkpoints are). The grouped-GEMM kernel itself is checked against the
reference in tests/test_kernels_fp8.py (interpreter) and on the GPU.

transformers cannot be the reference for the quantized checkpoints: it does not load
per-expert FP8 tensors into its fused MoE layout (5.24 leaves the experts random), so
the checks are: llm-compressor's checkpoint and kiln's own quantization give the same
engine bit for bit; the FP8 engine sits at FP8's distance from the float model.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.build import build
from kiln.config import BuildConfig
from kiln.errors import CheckpointError
from kiln.eval import sequence_logits
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from tests import quant_checkpoints as qc

TOKENS = list(range(3, 60))
CFG = dict(dtype="float32", max_seq_len=128, max_batch_size=4)
ROUTER = "re:.*mlp.gate$"  # llm-compressor recipes keep MoE routers unquantized
FP8 = torch.float8_e4m3fn


def _logits(engine_dir) -> torch.Tensor:
    return sequence_logits(LLMEngine(engine_dir, RuntimeConfig(device="cpu")), TOKENS)


def _hf_logits(hf_model) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([TOKENS])).logits[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def mixtral_fp8(tiny_checkpoints, tmp_path_factory):
    """The tiny Mixtral as llm-compressor's FP8_DYNAMIC checkpoint (router and LM head
    ignored)."""
    pytest.importorskip("llmcompressor")
    folder, _ = tiny_checkpoints["mixtral"]
    return qc.compressed_tensors_fp8(folder, tmp_path_factory.mktemp("moe-fp8") / "ct",
                                     ignore=("lm_head", ROUTER))


def test_fp8_checkpoint_and_build_time_fp8_give_one_engine(mixtral_fp8, tiny_checkpoints,
                                                           tmp_path):
    """llm-compressor's per-expert e4m3 weights and channel scales land in kiln's stacked
    expert tensors exactly as `--quantization fp8` makes them from the float weights: the
    two engines' logits are equal bit for bit. Against transformers' float model: 0.21
    relative error measured (a routed model is touchy: rounding the weights alone moves it
    by 0.20, as it flips some top-2 choices; the dense tiny Llama moves by 0.10); a scale
    row shifted by one, or the experts' scales swapped, gives 0.41-0.43."""
    folder, hf_model = tiny_checkpoints["mixtral"]
    from_ckpt = build(mixtral_fp8, tmp_path / "ct", BuildConfig(**CFG), progress=False)
    from_float = build(folder, tmp_path / "q", BuildConfig(**CFG, quantization="fp8"),
                       progress=False)
    state = load_file(str(from_ckpt / "rank0.safetensors"))
    experts = "model.layers.0.mlp.experts"
    assert state[f"{experts}.w13"].dtype == FP8 and state[f"{experts}.w2"].dtype == FP8
    assert state[f"{experts}.w13"].shape == (4, 256, 64)  # gate rows then up rows
    assert state[f"{experts}.w13_scale"].shape == (4, 256)
    assert state[f"{experts}.w2_scale"].shape == (4, 64)
    assert state["model.layers.0.mlp.gate.weight"].dtype == torch.float32
    got = _logits(from_ckpt)
    assert torch.equal(got, _logits(from_float))
    error = _rel(got, _hf_logits(hf_model))
    assert 0.005 < error < 0.3, error


@pytest.mark.parametrize("arch", ["qwen2-moe", "qwen3-moe"])
def test_fp8_moe_engines_stay_close_to_transformers(arch, tiny_checkpoints, tmp_path):
    """Qwen2-MoE: FP8 experts beside an FP8 shared expert (its sigmoid gate stays float)
    and a dense FP8 layer; Qwen3-MoE: renormalised top-3 of FP8 experts. Measured 0.10 and
    0.09 relative error against transformers' float model (the tiny Llama: 0.10)."""
    folder, hf_model = tiny_checkpoints[arch]
    engine = build(folder, tmp_path / "e", BuildConfig(**CFG, quantization="fp8"),
                   progress=False)
    state = load_file(str(engine / "rank0.safetensors"))
    assert state["model.layers.0.mlp.experts.w13"].dtype == FP8
    want = _hf_logits(hf_model)
    error = _rel(_logits(engine), want)
    assert 0.005 < error < 0.2, error


def test_experts_a_checkpoint_leaves_unquantized_stay_float(tiny_checkpoints, tmp_path):
    """A recipe that ignores the experts: attention is FP8, the experts are read as the
    float tensors they are (the engine records them as ignored). Measured 0.19 relative
    error: FP8 attention alone moves the routing of this tiny model as much."""
    pytest.importorskip("llmcompressor")
    folder, hf_model = tiny_checkpoints["mixtral"]
    ckpt = qc.compressed_tensors_fp8(folder, tmp_path / "ct",
                                     ignore=("lm_head", ROUTER, "re:.*experts.*"))
    engine = build(ckpt, tmp_path / "e", BuildConfig(**CFG), progress=False)
    state = load_file(str(engine / "rank0.safetensors"))
    assert state["model.layers.0.mlp.experts.w13"].dtype == torch.float32
    assert "model.layers.0.mlp.experts.w13_scale" not in state
    assert state["model.layers.0.self_attn.qkv_proj.weight"].dtype == FP8
    error = _rel(_logits(engine), _hf_logits(hf_model))
    assert 0.001 < error < 0.3, error


def _edited(src, dest, config_edit=None, tensor_edit=None):
    """A copy of checkpoint folder src with its config / tensors edited."""
    dest.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors" and tensor_edit:
            save_file(tensor_edit(load_file(str(f))), str(dest / f.name),
                      metadata={"format": "pt"})
        elif f.name == "config.json" and config_edit:
            config = json.loads(f.read_text())
            config_edit(config)
            (dest / f.name).write_text(json.dumps(config))
        else:
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_fp8_moe_checkpoints_kiln_cannot_run_fail_at_build(mixtral_fp8, tmp_path):
    """Some experts of a layer ignored (kiln holds a layer's experts in one tensor), or a
    quantized router: the build stops with what is wrong, before writing anything."""
    def ignore_one_expert(config):
        config["quantization_config"]["ignore"].append(
            "model.layers.0.block_sparse_moe.experts.1.down_proj")
    partial = _edited(mixtral_fp8, tmp_path / "partial", config_edit=ignore_one_expert)
    with pytest.raises(CheckpointError, match="only some of the projections.*experts"):
        build(partial, tmp_path / "e1", BuildConfig(**CFG), progress=False)

    def quantize_router(tensors):
        name = next(k for k in tensors if k.endswith("block_sparse_moe.gate.weight"))
        tensors[name] = tensors[name].to(FP8)
        return tensors
    router = _edited(mixtral_fp8, tmp_path / "router", tensor_edit=quantize_router)
    with pytest.raises(CheckpointError, match="router is read in high precision"):
        build(router, tmp_path / "e2", BuildConfig(**CFG), progress=False)
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()


def test_per_tensor_expert_scales(mixtral_fp8, tmp_path):
    """One scale per expert projection (modelopt's FP8 export writes them so): every row
    of that projection takes it, and the engine stays as close as the per-channel one."""
    experts = {}

    def per_tensor(tensors):
        for name in [k for k in tensors if ".experts." in k and k.endswith(".weight")]:
            w = tensors[name].float() * tensors[name + "_scale"]
            scale = w.abs().max() / 448.0
            tensors[name] = (w / scale).to(FP8)
            tensors[name + "_scale"] = scale.reshape(())
            experts[name] = scale
        return tensors
    ckpt = _edited(mixtral_fp8, tmp_path / "tensor", tensor_edit=per_tensor)
    engine = build(ckpt, tmp_path / "e", BuildConfig(**CFG), progress=False)
    state = load_file(str(engine / "rank0.safetensors"))
    w13_scale = state["model.layers.1.mlp.experts.w13_scale"]  # [E, gate rows + up rows]
    gate = experts["model.layers.1.block_sparse_moe.experts.2.gate_proj.weight"]
    up = experts["model.layers.1.block_sparse_moe.experts.2.up_proj.weight"]
    assert torch.equal(w13_scale[2], torch.cat([gate.expand(128), up.expand(128)]))
    down = experts["model.layers.1.block_sparse_moe.experts.3.down_proj.weight"]
    assert torch.equal(state["model.layers.1.mlp.experts.w2_scale"][3], down.expand(64))
    channel = build(mixtral_fp8, tmp_path / "c", BuildConfig(**CFG), progress=False)
    assert _rel(_logits(engine), _logits(channel)) < 0.2  # measured 0.07


def test_compare_hf_dequantizes_fp8_experts(tiny_checkpoints, tmp_path):
    """`kiln bench --compare-hf` on an FP8 MoE engine: transformers gets every expert's
    e4m3 rows times their scales, and differs from the engine by the activations'
    quantization alone (measured 0.14 relative; the float model is 0.21 away)."""
    from kiln.bench.hf_reference import hf_model_from_engine

    folder, _ = tiny_checkpoints["mixtral"]
    engine = build(folder, tmp_path / "e", BuildConfig(**CFG, quantization="fp8"),
                   progress=False)
    model = hf_model_from_engine(engine)
    state = load_file(str(engine / "rank0.safetensors"))
    w13 = state["model.layers.1.mlp.experts.w13"]
    want = w13.float() * state["model.layers.1.mlp.experts.w13_scale"][..., None]
    assert torch.equal(model.model.layers[1].mlp.experts.gate_up_proj.data, want)
    assert _rel(_logits(engine), _hf_logits(model)) < 0.2


def test_ignore_patterns_of_moe_checkpoints(mixtral_fp8, tiny_checkpoints, tmp_path):
    """Ignore lists as recipes write them: a router pattern without `$` (it also matches
    the gate_proj an MoE layer does not have), and Qwen2-MoE's shared expert left float
    beside FP8 experts."""
    def router_prefix(config):
        config["quantization_config"]["ignore"] = ["lm_head", "re:.*mlp.gate"]
    loose = _edited(mixtral_fp8, tmp_path / "loose", config_edit=router_prefix)
    engine = build(loose, tmp_path / "e1", BuildConfig(**CFG), progress=False)
    plain = build(mixtral_fp8, tmp_path / "e0", BuildConfig(**CFG), progress=False)
    assert torch.equal(_logits(engine), _logits(plain))

    folder, _ = tiny_checkpoints["qwen2-moe"]
    ckpt = qc.compressed_tensors_fp8(folder, tmp_path / "qwen", ignore=(
        "lm_head", ROUTER, r"re:.*shared_expert_gate$", r"re:.*shared_expert\..*"))
    engine = build(ckpt, tmp_path / "e2", BuildConfig(**CFG), progress=False)
    state = load_file(str(engine / "rank0.safetensors"))
    assert state["model.layers.0.mlp.experts.w13"].dtype == FP8
    assert state["model.layers.0.mlp.shared_expert.gate_up_proj.weight"].dtype == torch.float32
    assert state["model.layers.1.mlp.gate_up_proj.weight"].dtype == FP8  # the dense layer


def test_fp8_moe_engines_of_the_earlier_format_ask_for_a_rebuild(tiny_checkpoints, tmp_path):
    """Format 1 kept FP8 engines' experts in the model dtype: such an engine is refused
    with what to do (the engine cache rebuilds it), other format-1 engines still load."""
    from kiln.build import load_engine_config
    from kiln.errors import KilnError

    def as_format_1(engine_dir):
        path = engine_dir / "engine.json"
        data = json.loads(path.read_text())
        data["format_version"] = 1
        path.write_text(json.dumps(data))

    moe = build(tiny_checkpoints["mixtral"][0], tmp_path / "moe",
                BuildConfig(**CFG, quantization="fp8"), progress=False)
    dense = build(tiny_checkpoints["llama"][0], tmp_path / "dense",
                  BuildConfig(**CFG, quantization="fp8"), progress=False)
    for engine in (moe, dense):
        as_format_1(engine)
    with pytest.raises(KilnError, match="rebuild the engine"):
        load_engine_config(moe)
    assert load_engine_config(dense).format_version == 1
