"""Model zoo: the random-weight presets of the new architectures cover every parameter,
and a shrunk copy of each builds and generates (parity with transformers for every
architecture is in test_parity.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.build import build
from kiln.checkpoint.random import PRESETS, RandomCheckpoint
from kiln.config import BuildConfig, ModelConfig

NEW_PRESETS = ["gemma-2-9b", "phi-2", "falcon-7b", "bloom-7b1", "mixtral-8x7b"]


def shrunk(preset: str) -> ModelConfig:
    """The preset's architecture and flags at a few-kilobyte size."""
    cfg = ModelConfig(**PRESETS[preset])
    heads = 4
    kv_heads = heads if cfg.num_kv_heads == cfg.num_heads else 2
    layer_types = cfg.layer_types[:2]
    moe = dict(moe_intermediate_size=32, moe_layers=(0, 1), num_experts=4) \
        if cfg.num_experts else {}
    return dataclasses.replace(
        cfg, **moe, vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=20, layer_types=layer_types,
        sliding_window=5 if cfg.sliding_window else None, max_position_embeddings=256,
        bos_token_id=None, eos_token_ids=())


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_preset_shapes_cover_the_model(preset):
    """Every parameter of the real-size model has a tensor (meta shapes: no memory)."""
    ckpt = RandomCheckpoint(preset)
    shapes = dict(ckpt._shapes())
    cfg = ckpt.config
    assert shapes["model.embed_tokens.weight"] == (cfg.vocab_size, cfg.hidden_size)
    qkv = shapes["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv == (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size)
    assert sum(name.startswith("model.layers.") and name.endswith("qkv_proj.weight")
               for name in shapes) == cfg.num_layers


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_shrunk_preset_builds_and_generates(preset, tmp_path):
    engine = build(RandomCheckpoint(shrunk(preset), dtype=torch.float32), tmp_path / "e",
                   BuildConfig(dtype="float32", max_seq_len=64), progress=False)
    llm = LLM(engine, device="cpu")
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [12, 12]
    # Batched and alone agree (windows, soft-caps and partial rotary per sequence).
    alone = llm.generate(prompts[:1], SamplingParams(max_tokens=12, temperature=0,
                                                     ignore_eos=True))
    assert alone[0].token_ids == outs[0].token_ids


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "gemma-2-9b"])
def test_compare_hf_model_holds_the_engine_weights(preset, tmp_path):
    """`kiln bench --compare-hf` runs transformers on the engine's weights: experts and
    Gemma's folded (1 + w) norms must go back to transformers' layout exactly."""
    from kiln.bench.hf_reference import hf_model_from_engine
    from kiln.eval import sequence_logits

    engine = build(RandomCheckpoint(shrunk(preset), dtype=torch.float32), tmp_path / "e",
                   BuildConfig(dtype="float32", max_seq_len=64), progress=False)
    tokens = list(range(3, 40))
    with torch.no_grad():
        want = hf_model_from_engine(engine)(torch.tensor([tokens])).logits[0]
    got = sequence_logits(LLM(engine, device="cpu").engine, tokens)
    assert (got - want).abs().max() < 1e-4


def test_moe_roofline_counts_only_the_routed_experts(tmp_path):
    """Batch-1 decode reads top_k of num_experts experts per layer (the Mixtral roofline
    of `kiln bench latency`), counted here by hand in float32 bytes."""
    from kiln.bench.roofline import decode_bytes_per_token

    cfg = shrunk("mixtral-8x7b")
    engine = build(RandomCheckpoint(cfg, dtype=torch.float32), tmp_path / "e",
                   BuildConfig(dtype="float32", max_seq_len=64), progress=False)
    h = cfg.hidden_size
    attention = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h
    routed = cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size
    per_layer = attention + 2 * h + cfg.num_experts * h + routed  # norms, router, experts
    want = 4 * (cfg.num_layers * per_layer + h + cfg.vocab_size * h)  # final norm, LM head
    assert decode_bytes_per_token(LLM(engine, device="cpu").engine, 0) == want


def test_sliding_window_releases_blocks_and_matches_transformers(tiny_checkpoints, tmp_path):
    """Mistral with window 6 on every layer: a 200-token generation holds a bounded number
    of KV blocks (those behind the window go back to the pool as it advances) and gives
    transformers' greedy tokens."""
    from kiln.runtime.engine import LLMEngine, RuntimeConfig

    folder, hf_model = tiny_checkpoints["mistral-window"]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(dtype="float32", max_seq_len=512),
                       progress=False)
    engine = LLMEngine(engine_dir, RuntimeConfig(device="cpu", num_kv_blocks=40))
    prompt, new = [5, 17, 99, 3, 42, 7, 7, 8], 200
    engine.add_request(prompt, SamplingParams(max_tokens=new, temperature=0,
                                              ignore_eos=True), "r")
    held, tokens = [], None
    while engine.has_unfinished():
        for request in list(engine.scheduler.running):
            held.append(engine.kv.num_held_blocks(request))
        for out in engine.step():
            tokens = out.token_ids
    # 6-token window + the kernels' 64-key margin + the block being written.
    assert max(held) <= -(-(6 + 64) // 16) + 2 < -(-(len(prompt) + new) // 16)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert tokens == want


def test_longrope_long_factors_beyond_the_original_context(tiny_checkpoints, tmp_path):
    """An engine longer than Phi-3's original context rotates with the long factors, as
    transformers does for a sequence past it (a 300-token prefill, original 256)."""
    from kiln.eval import sequence_logits

    folder, hf_model = tiny_checkpoints["phi3-longrope"]
    engine = build(folder, tmp_path / "e", BuildConfig(dtype="float32", max_seq_len=512),
                   progress=False)
    tokens = [(7 * i + 3) % 250 + 3 for i in range(300)]
    with torch.no_grad():
        want = hf_model(torch.tensor([tokens])).logits[0]
    got = sequence_logits(LLM(engine, device="cpu").engine, tokens)
    assert (got - want).abs().max() < 1e-4


def test_longrope_switches_per_sequence_like_transformers(tiny_checkpoints, tmp_path):
    """In one engine of 512 positions (original context 256), batched together: a short
    prompt whose generation crosses position 256 (short factors, then long ones) and a
    300-token prompt (long factors from its first token) give transformers' greedy tokens;
    the long prompt shares its first blocks with the short one but not their KV."""
    from kiln.runtime.engine import LLMEngine, RuntimeConfig

    folder, hf_model = tiny_checkpoints["phi3-longrope"]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(dtype="float32", max_seq_len=512),
                       progress=False)
    engine = LLMEngine(engine_dir, RuntimeConfig(device="cpu"))
    short = [(5 * i + 1) % 250 + 3 for i in range(240)]
    prompts = {"short": short, "long": short + [(3 * i + 2) % 250 + 3 for i in range(60)]}
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    got = {}
    for name, prompt in prompts.items():
        engine.add_request(prompt, params, name)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.token_ids
    for name, prompt in prompts.items():
        with torch.no_grad():
            want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24,
                                     do_sample=False, pad_token_id=0,
                                     eos_token_id=None)[0, len(prompt):].tolist()
        assert got[name] == want, name


@pytest.mark.parametrize("arch,field,value", [
    ("Qwen2ForCausalLM", "use_sliding_window", True),  # with max_window_layers
    ("BloomForCausalLM", "apply_residual_connection_post_layernorm", True),
    ("FalconForCausalLM", "alibi", True),
    ("PhiForCausalLM", "qk_layernorm", True),
])
def test_config_fields_kiln_cannot_honour_fail_by_name(arch, field, value):
    from kiln.errors import CheckpointError

    hf = dict(architectures=[arch], vocab_size=16, hidden_size=8, intermediate_size=8,
              num_hidden_layers=2, num_attention_heads=2, sliding_window=4,
              max_window_layers=1, **{field: value})
    with pytest.raises(CheckpointError, match=field):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_kiln_run_on_a_folder_a_user_brings(arch, tmp_path, monkeypatch, capsys):
    """`kiln run FOLDER --prompt TEXT` on a GPT-2 / Gemma 2 folder with its own tokenizer
    (byte-level BPE trained here): the text transformers generates greedily."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from kiln.cli import main
    from tests.conftest import make_hf_model

    folder = tmp_path / arch
    model = make_hf_model(arch, folder)
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(["the kiln fires the clay pots at night"] * 4,
                                vocab_size=model.config.vocab_size, min_frequency=1,
                                show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer)
    tokenizer.save_pretrained(folder)
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    prompt = "the kiln fires"
    assert main(["run", str(folder), "--prompt", prompt, "--max-tokens", "10",
                 "--device", "cpu", "--dtype", "float32"]) in (0, None)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[0, ids.shape[1]:]
    printed = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith(prompt)]
    # A random model emits byte fragments: the stream may hold back incomplete characters.
    assert len(printed) == 1 and (prompt + tokenizer.decode(want)).startswith(printed[0])
    llm = LLM(folder, BuildConfig(dtype="float32"), device="cpu")  # the engine just cached
    out = llm.generate(prompt, SamplingParams(max_tokens=10, temperature=0,
                                              ignore_eos=True))[0]
    assert out.token_ids == want.tolist()


@pytest.mark.parametrize("arch", ["gemma", "gemma2"])
def test_gguf_gemma_matches_transformers(arch, tmp_path):
    """A tiny Gemma / Gemma 2 written to GGUF as llama.cpp's converter does (tensor names
    from the gguf package's own map, norms stored as 1 + w, soft-caps and window in the
    metadata) and read back by kiln gives transformers' logits."""
    import transformers

    from kiln.eval import sequence_logits
    from tests.conftest import TINY

    extra = dict(head_dim=16, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
    if arch == "gemma2":  # llama.cpp scales by head_dim^-1/2 (all but the 27B)
        extra.update(query_pre_attn_scalar=16, sliding_window=6, attn_logit_softcapping=1.5,
                     final_logit_softcapping=2.0)
    config = getattr(transformers, "GemmaConfig" if arch == "gemma" else "Gemma2Config")(
        **{**TINY, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    path = tmp_path / "m.gguf"

    def metadata(w):
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        if arch == "gemma2":
            w.add_attn_logit_softcapping(config.attn_logit_softcapping)
            w.add_final_logit_softcapping(config.final_logit_softcapping)
            w.add_sliding_window(config.sliding_window)

    def tensor(name, data):  # llama.cpp stores Gemma's norms as 1 + w
        return data + 1.0 if name.endswith("norm.weight") else data

    write_gguf(model, arch, path, metadata, tensor)
    engine = build(path, tmp_path / "e", BuildConfig(dtype="float32", max_seq_len=128),
                   progress=False)
    tokens = list(range(3, 60))
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0]
    got = sequence_logits(LLM(engine, device="cpu").engine, tokens)
    assert (got - want).abs().max() < 1e-4


def write_gguf(model, arch: str, path, metadata, tensor) -> None:
    """model's weights under the gguf package's tensor names for `arch` (its own HF-name
    map, independent of kiln's), common metadata, then the family's (metadata(writer),
    tensor(hf_name, array) -> array as llama.cpp's converter stores it)."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    metadata(w)
    for name, weight in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, kind = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{kind}", tensor(name, weight.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["gpt2", "phi"])
def test_gguf_gpt2_phi2_match_transformers(arch, tiny_checkpoints, tmp_path):
    """GPT-2 (Conv1D weights transposed as llama.cpp's converter does, fused attn_qkv,
    learned positions) and Phi-2 (partial rotary from rope.dimension_count, LM-head bias)
    written to GGUF and read back by kiln give transformers' logits."""
    from kiln.eval import sequence_logits

    _, model = tiny_checkpoints[arch]
    config = model.config
    gguf_arch = "gpt2" if arch == "gpt2" else "phi2"
    head_dim = config.hidden_size // config.num_attention_heads

    def metadata(w):
        w.add_layer_norm_eps(config.layer_norm_epsilon if arch == "gpt2"
                             else config.layer_norm_eps)
        if arch == "phi":
            w.add_rope_dimension_count(int(head_dim * config.rope_parameters[
                "partial_rotary_factor"]))
            w.add_rope_freq_base(10000.0)

    def tensor(name, data):
        conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight",
                  ".mlp.c_proj.weight")
        return data.T.copy() if arch == "gpt2" and name.endswith(conv1d) else data

    path = tmp_path / "m.gguf"
    write_gguf(model, gguf_arch, path, metadata, tensor)
    engine = build(path, tmp_path / "e", BuildConfig(dtype="float32", max_seq_len=128),
                   progress=False)
    tokens = list(range(3, 60))
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0]
    got = sequence_logits(LLM(engine, device="cpu").engine, tokens)
    assert (got - want).abs().max() < 1e-4


def _llama_cpp_permute(w, n_head: int):
    # llama.cpp's converter reorders Q/K rows of "llama" models for its interleaved rotary.
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("arch,gguf_arch", [("mixtral", "llama"), ("qwen2-moe", "qwen2moe"),
                                            ("qwen3-moe", "qwen3moe")])
def test_gguf_moe_matches_transformers(arch, gguf_arch, tiny_checkpoints, tmp_path):
    """Mixtral (llama.cpp's "llama" with experts) and Qwen2/3-MoE GGUFs: experts stacked
    per projection (ffn_*_exps), Qwen2-MoE's shared expert and dense layer."""
    import re

    import gguf
    import numpy as np
    from safetensors.torch import load_file

    from kiln.eval import sequence_logits

    folder, model = tiny_checkpoints[arch]
    config = model.config
    experts = getattr(config, "num_local_experts", None) or config.num_experts
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[gguf_arch.upper()],
                                     config.num_hidden_layers)
    dense_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    stacked_names = {"w1": "ffn_gate_exps", "gate_proj": "ffn_gate_exps", "w3": "ffn_up_exps",
                     "up_proj": "ffn_up_exps", "w2": "ffn_down_exps",
                     "down_proj": "ffn_down_exps"}
    w = gguf.GGUFWriter(tmp_path / "m.gguf", gguf_arch)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or \
        config.hidden_size // config.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_expert_count(experts)
    w.add_expert_used_count(config.num_experts_per_tok)
    w.add_expert_feed_forward_length(inter)
    if getattr(config, "shared_expert_intermediate_size", 0):
        w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    stacks: dict[str, list] = {}
    for name, weight in load_file(str(folder / "model.safetensors")).items():  # HF names
        data = weight.float().numpy()
        expert = re.match(r"model\.layers\.(\d+)\.\w+\.experts\.(\d+)\.(\w+)\.weight", name)
        if expert:
            layer, _, proj = expert.groups()
            stacks.setdefault(f"blk.{layer}.{stacked_names[proj]}.weight", []).append(data)
            continue
        if gguf_arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_attention_heads if ".q_proj." in name \
                else config.num_key_value_heads
            data = _llama_cpp_permute(data, heads)
        if name.endswith("shared_expert_gate.weight"):
            data = data.reshape(-1)
        base, kind = name.rsplit(".", 1)
        # A dense layer among MoE ones (mlp_only_layers) takes llama's names.
        gguf_name = names.get_name(base) or dense_names.get_name(base)
        w.add_tensor(f"{gguf_name}.{kind}", data)
    for name, parts in stacks.items():
        w.add_tensor(name, np.stack(parts))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    engine = build(tmp_path / "m.gguf", tmp_path / "e",
                   BuildConfig(dtype="float32", max_seq_len=128), progress=False)
    tokens = list(range(3, 60))
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0]
    got = sequence_logits(LLM(engine, device="cpu").engine, tokens)
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("arch,tables", [("llama", 1), ("gemma3", 2)])
def test_layers_share_their_rotary_table(arch, tables, tiny_checkpoints):
    """One [max_pos, rotary_dim] table per distinct rotary, not one per layer (at 128k
    positions a table is 64 MiB: 2 GiB for 32 layers); Gemma 3's local layers have their
    own base."""
    from kiln.checkpoint import open_checkpoint
    from kiln.distributed import Mapping
    from kiln.models import create_model

    cfg = open_checkpoint(tiny_checkpoints[arch][0]).config
    model = create_model(cfg, Mapping(), 256)
    found = {id(layer.self_attn.rotary.cos_sin) for layer in model.model.layers.values()}
    assert len(found) == tables
