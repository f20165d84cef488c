"""HF folder QA findings (44th session): config.json keys left to transformers' class
defaults, tokenizer.model folders' added tokens and BOS flag, malformed rope_scaling,
old-format and sharded .bin files, stray .safetensors, unused tensors, special tokens only
in special_tokens_map.json, architectures kiln does not know by that name, error wording,
unigram tokenizer.model, the cache name of `kiln run .`."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.build import build
from kiln.config import BuildConfig
from kiln.errors import CheckpointError
from kiln.model_config import MODEL_TYPES, SUPPORTED_ARCHITECTURES, ModelConfig
from tests.conftest import make_hf_model

F32 = BuildConfig(dtype="float32", max_seq_len=64)
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = [3, 14, 15, 92, 65]
SHAPE = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def _hf_greedy(model: torch.nn.Module) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(PROMPT):].tolist()


def _kiln_greedy(engine: Path) -> list[int]:
    return LLM(engine, device="cpu").generate(PROMPT, GREEDY)[0].token_ids


def _edit_config(folder: Path, drop: tuple[str, ...] = (), **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key in drop:
        config.pop(key, None)
    path.write_text(json.dumps({**config, **changes}))


# ---- D1: keys config.json leaves out mean transformers' class defaults -----------------------

def _layers_view(cfg: ModelConfig) -> dict:
    """ModelConfig's fields, with layer_types as the window each layer gets (an empty
    tuple and all-"full_attention" mean the same)."""
    fields = cfg.to_dict()
    fields["layer_types"] = [cfg.layer_window(i) for i in range(cfg.num_layers)]
    return fields


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_absent_keys_read_as_transformers_class_defaults(model_type):
    """config.json with only the shape kiln requires: every field kiln reads is what
    transformers' config class makes of the same file (its defaults for the rest)."""
    import transformers

    arch = MODEL_TYPES[model_type]
    hf_class = type(transformers.AutoConfig.for_model(model_type))
    native = {hf_class.attribute_map.get(k, k): v for k, v in SHAPE.items()}
    minimal = {"architectures": [arch], "model_type": model_type, **native}
    filled = hf_class(**native).to_dict()
    filled["architectures"] = [arch]
    want, got = ModelConfig.from_hf(filled), ModelConfig.from_hf(minimal)
    assert _layers_view(got) == _layers_view(want)


def test_every_architecture_has_a_model_type():
    assert sorted(MODEL_TYPES.values()) == sorted(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("arch,drop", [
    # google/gemma-2-2b's config.json (transformers 4.42) has no tie_word_embeddings.
    ("gemma2", ("tie_word_embeddings", "attn_logit_softcapping", "final_logit_softcapping")),
    ("starcoder2", ("tie_word_embeddings", "use_bias", "hidden_act", "norm_epsilon")),
    ("mixtral", ("rope_parameters", "rope_theta", "rms_norm_eps")),
    ("phi", ("rope_parameters", "partial_rotary_factor", "hidden_act")),
], ids=["gemma2", "starcoder2", "mixtral", "phi"])
def test_folder_without_keys_runs_as_transformers_loads_it(arch, drop, tmp_path):
    """These stopped with "checkpoint is missing lm_head.weight" (Gemma 2, StarCoder2) or
    ran another model (Mixtral's rope_theta 1e4, Phi's full rotary)."""
    from transformers import AutoModelForCausalLM

    from kiln.eval import sequence_logits

    make_hf_model(arch, tmp_path / "hf")
    _edit_config(tmp_path / "hf", drop=drop)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    engine = build(tmp_path / "hf", tmp_path / "engine", F32, progress=False)
    tokens = list(range(3, 40))
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0]
    got = sequence_logits(LLM(engine, device="cpu").engine, tokens)
    assert (got - want).abs().max() < 1e-4


# ---- D2 / D10: a folder with tokenizer.model only -------------------------------------------

def _train_sentencepiece(kind: str, vocab_size: int, **options) -> bytes:
    """A tiny SentencePiece model (sentencepiece's own trainer) as tokenizer.model bytes."""
    import io
    import random

    import sentencepiece as spm

    words = ("The capital of France is Paris. The quick brown fox jumps over the lazy dog. "
             "Hello world, this is a tiny tokenizer for kiln.").split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(500)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type=kind, byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2,
        unk_id=0, pad_id=-1, hard_vocab_limit=False, minloglevel=2, **options)
    return model.getvalue()


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory) -> Path:
    """A tiny Llama (vocab 352) with a BPE tokenizer.model (330 pieces) and no other
    tokenizer file."""
    folder = tmp_path_factory.mktemp("sp") / "hf"
    make_hf_model("llama", folder, configs={"llama": ("LlamaConfig", dict(vocab_size=352))})
    (folder / "tokenizer.model").write_bytes(_train_sentencepiece("bpe", 330))
    return folder


def _chatml(special: bool = True) -> dict:
    def token(text: str) -> dict:
        return {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": special}
    return {"0": token("<unk>"), "1": token("<s>"), "2": token("</s>"),
            "330": token("<|im_end|>"), "331": token("<|im_start|>")}


SP_LAYOUTS = {
    # An OpenHermes-style ChatML model: tokens added past the SentencePiece pieces.
    "added_tokens_decoder": ({"eos_token": "<|im_end|>", "added_tokens_decoder": _chatml()},
                             {}),
    "no BOS": ({"add_bos_token": False}, {}),
    "legacy": ({"legacy": True, "eos_token": "<|im_end|>", "added_tokens_decoder": _chatml()},
               {}),
    # Before transformers 4.34: added_tokens.json, specials in special_tokens_map.json.
    "added_tokens.json": ({}, {
        "added_tokens.json": {"<|im_end|>": 330, "<|im_start|>": 331},
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "<|im_end|>",
                                    "unk_token": "<unk>"}}),
}
SP_TEXTS = ["Hello world", " leading space", "<|im_start|>user\nHello<|im_end|>\n",
            "the lazy dog</s> and <s>naïve 日本"]


@pytest.mark.parametrize("layout", list(SP_LAYOUTS))
def test_sentencepiece_folder_tokenizes_as_transformers(layout, sp_folder, tmp_path):
    """ChatML tokens came out as bytes (and eos_token as None), add_bos_token: false still
    added BOS: the conversion read tokenizer.model alone."""
    from transformers import AutoTokenizer

    from kiln.tokenizer import Tokenizer

    config, files = SP_LAYOUTS[layout]
    folder = shutil.copytree(sp_folder, tmp_path / "hf")
    # add_bos_token written out: without it transformers 5 adds no BOS (its LlamaTokenizer
    # documents True, transformers 4 added one), nor does kiln: tests/test_tokenizer_qa45.py.
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": True, **config}))
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data))
    engine = build(folder, tmp_path / "engine", F32, progress=False)
    ours, theirs = Tokenizer.from_engine(engine), AutoTokenizer.from_pretrained(folder)
    for text in SP_TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    assert ours.eos_token_id == theirs.eos_token_id
    ids = theirs("<|im_start|>user\nHello<|im_end|>")["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_char_tokenizer_model_gives_one_accurate_warning(sp_folder, tmp_path, caplog):
    """It said "not a BPE SentencePiece model" and then "has no tokenizer files" (for a
    unigram model then; kiln converts those now: tests/test_tokenizer_qa45.py)."""
    folder = shutil.copytree(sp_folder, tmp_path / "hf")
    (folder / "tokenizer.model").write_bytes(_train_sentencepiece("char", 300))
    with caplog.at_level(logging.WARNING):
        engine = build(folder, tmp_path / "engine", F32, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "char SentencePiece model" in warnings[0]
    assert "token ids only" in warnings[0] and "no tokenizer files" not in warnings[0]
    assert not (engine / "tokenizer" / "tokenizer.json").exists()


# ---- D3: rope_scaling kiln cannot compute a table from ----------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, list[int]]:
    """A tiny HF Llama folder and the tokens an engine built from it generates."""
    folder = tmp_path_factory.mktemp("llama") / "hf"
    make_hf_model("llama", folder)
    engine = build(folder, tmp_path_factory.mktemp("ref") / "e", F32, progress=False)
    return folder, _kiln_greedy(engine)


@pytest.mark.parametrize("scaling,words", [
    ({"type": "linear"}, "type 'linear' has no 'factor'"),
    ({"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0},
     "type 'llama3' has no 'factor'"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8}, "has no 'long_factor'"),
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 3},
     "'long_factor' is \\[2.0, 2.0, 2.0\\]; it must be a list of 8 numbers"),
    ({"rope_type": "linear", "factor": "four"}, "'factor' is 'four'; it must be a positive"),
    ({"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}, "type 'su'"),
    ({"type": "mrope", "mrope_section": [2, 3, 3]}, "type 'mrope'"),
    ({"type": "dynamic", "factor": 2.0}, "type 'dynamic'"),
], ids=["linear", "llama3", "longrope", "longrope-length", "factor-type", "su", "mrope",
        "dynamic"])
def test_malformed_rope_scaling_is_one_line(scaling, words, llama, tmp_path):
    """These were a KeyError traceback from kiln/layers/rotary.py, after the build began."""
    folder = shutil.copytree(llama[0], tmp_path / "hf")
    _edit_config(folder, drop=("rope_parameters",), rope_theta=10000.0, rope_scaling=scaling)
    with pytest.raises(CheckpointError, match=words) as e:
        build(folder, tmp_path / "engine", F32, progress=False)
    assert "rope_scaling" in str(e.value) and "\n" not in str(e.value)
    if "type '" in words and "has no" not in words:
        assert "kiln supports the rope types default, linear, llama3, longrope, yarn" \
            in str(e.value)
    assert not (tmp_path / "engine").exists()


def test_phi3_su_rope_reads_as_longrope():
    """Phi-3's first 128k configs say "su" (transformers' Phi3Config reads it as longrope)."""
    factors = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    config = {"architectures": ["Phi3ForCausalLM"], **SHAPE, "max_position_embeddings": 512,
              "original_max_position_embeddings": 128,
              "rope_scaling": {"type": "su", **factors}}
    assert ModelConfig.from_hf(config).rope_scaling == {
        "rope_type": "longrope", **factors, "original_max_position_embeddings": 128,
        "factor": 4.0}


# ---- D4 / D5 / D11: which weight files are read ---------------------------------------------

def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_old_format_pytorch_model_bin(llama, tmp_path):
    """torch.save's format before PyTorch 1.6 (not a zip) was refused: "mmap can only be
    used with files saved with `torch.save(_use_new_zipfile_serialization=True)"."""
    folder = shutil.copytree(llama[0], tmp_path / "hf")
    torch.save(_state(folder), folder / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    (folder / "model.safetensors").unlink()
    assert _kiln_greedy(build(folder, tmp_path / "engine", F32, progress=False)) == llama[1]


@pytest.mark.parametrize("stray", ["consolidated.safetensors", "adapter_model.safetensors"])
def test_stray_safetensors_beside_model_safetensors(stray, llama, tmp_path):
    """Every *.safetensors was read: Mistral's consolidated.safetensors or a PEFT adapter
    beside model.safetensors broke the build; transformers reads model.safetensors."""
    from safetensors.torch import save_file

    folder = shutil.copytree(llama[0], tmp_path / "hf")
    save_file({"layers.0.attention.wq.weight": torch.zeros(64, 64),
               "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}, folder / stray)
    assert _kiln_greedy(build(folder, tmp_path / "engine", F32, progress=False)) == llama[1]


def _sharded_bin(folder: Path, shards: int = 3) -> list[str]:
    state = _state(folder)
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    files, weight_map = [], {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
        files.append(file)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return files


def test_sharded_bin_index(llama, tmp_path):
    """A missing shard gave "checkpoint is missing 7 tensor(s)", not the file's name."""
    folder = shutil.copytree(llama[0], tmp_path / "hf")
    files = _sharded_bin(folder)
    assert _kiln_greedy(build(folder, tmp_path / "engine", F32, progress=False)) == llama[1]
    (folder / files[1]).unlink()
    with pytest.raises(CheckpointError, match=f"pytorch_model.bin.index.json lists shard\\(s\\) "
                                              f"that are missing: {files[1]}"):
        build(folder, tmp_path / "engine2", F32, progress=False)


# ---- D6: tensors the model does not use ------------------------------------------------------

def test_unused_tensors_warn_when_every_needed_one_is_there(llama, tmp_path, caplog):
    """An unused tensor was fatal ("has no place in a LlamaForCausalLM model");
    transformers loads past it. Missing tensors stay an error, which names the extra ones."""
    from safetensors.torch import save_file

    folder = shutil.copytree(llama[0], tmp_path / "hf")
    state = _state(folder)
    extra = {f"model.extra_{i}.weight": torch.zeros(4) for i in range(5)}
    save_file({**state, **extra}, folder / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        engine = build(folder, tmp_path / "engine", F32, progress=False)
    assert _kiln_greedy(engine) == llama[1]
    warned = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].startswith("the checkpoint holds 5 tensor(s) a LlamaForCausalLM model "
                                "does not use, ignored: model.extra_0.weight "
                                "(model.safetensors), ")
    del state["model.norm.weight"]
    save_file({**state, **extra}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing 1 tensor\\(s\\): model.norm.weight "
                                              "\\(it read model.safetensors\\); it holds 5 "
                                              "tensor\\(s\\) a LlamaForCausalLM model has no "
                                              "place for"):
        build(folder, tmp_path / "engine2", F32, progress=False)


# ---- D7: BOS / EOS only in special_tokens_map.json -------------------------------------------

def test_special_tokens_map_json_is_read(tmp_path):
    """Older exports name BOS / EOS only in special_tokens_map.json: kiln had none, so
    generation did not stop at EOS and chat templates lost {{ bos_token }}."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import AutoTokenizer

    from kiln.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast",
         "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
                          "{{ eos_token }}{% endfor %}"}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False}}))
    ours, theirs = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert (ours.special["bos_token"], ours.special["eos_token"]) == ("<s>", "</s>")
    assert ours.eos_token_id == theirs.eos_token_id == 2
    messages = [{"role": "user", "content": "hello"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False) == "<s>hello</s>"


# ---- D8 / D9: architectures, and mistakes said in one line ------------------------------------

@pytest.mark.parametrize("listed", [["LLaMAForCausalLM"], ["LlamaModel", "LlamaForCausalLM"]])
def test_architectures_kiln_does_not_know_by_that_name(listed, llama, tmp_path):
    """architectures[0] decided: an old export's "LLaMAForCausalLM" and a list that names
    the base model first were refused; transformers goes by model_type."""
    folder = shutil.copytree(llama[0], tmp_path / "hf")
    _edit_config(folder, architectures=listed, model_type="llama")
    assert _kiln_greedy(build(folder, tmp_path / "engine", F32, progress=False)) == llama[1]


@pytest.mark.parametrize("change,words", [
    (dict(drop=("architectures",), model_type="mamba"),
     "unsupported model_type 'mamba' in config.json; kiln supports the model types llama, "
     "mistral, "),
    (dict(architectures=["MambaForCausalLM"], model_type="mamba"),
     "unsupported architecture 'MambaForCausalLM' (model_type 'mamba'); kiln supports: "
     "LlamaForCausalLM, "),
    (dict(drop=("architectures", "model_type")), "names neither its architectures nor its "
                                                 "model_type"),
    (dict(num_hidden_layers=None), "config.json field 'num_hidden_layers' is null; it must be "
                                   "a positive whole number"),
    (dict(hidden_size="64"), "config.json field 'hidden_size' is \"64\"; it must be"),
], ids=["model_type", "architecture", "neither", "null", "string"])
def test_config_mistakes_name_the_field(change, words, llama, tmp_path):
    folder = shutil.copytree(llama[0], tmp_path / "hf")
    _edit_config(folder, **change)
    with pytest.raises(CheckpointError) as e:
        build(folder, tmp_path / "engine", F32, progress=False)
    assert words in str(e.value) and "<model_type=" not in str(e.value)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_file_of_the_folder_says_pass_the_folder(name, llama, tmp_path):
    folder = llama[0]
    with pytest.raises(CheckpointError, match=f"{folder / name} is a file of a HuggingFace "
                                              f"model folder; pass the folder that holds it: "
                                              f"{folder}$"):
        build(folder / name, tmp_path / "engine", F32, progress=False)


# ---- D12: the cache's name for an HF source ---------------------------------------------------

@pytest.mark.parametrize("typed", [".", "./", "../Llama-3.2-1B"])
def test_cache_names_the_folder_in_full(typed, llama, tmp_path, monkeypatch):
    """`kiln run .` made an engine named "-<key>"; Llama-3.2-1B one named "Llama-3-<key>"."""
    from kiln.resolve import resolve_engine

    folder = shutil.copytree(llama[0], tmp_path / "Llama-3.2-1B")
    monkeypatch.chdir(folder)
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    engine = resolve_engine(typed, F32, progress=False)
    assert engine.parent == tmp_path / "cache" / "engines"
    assert engine.name.startswith("Llama-3.2-1B-") and len(engine.name) == 13 + 16
