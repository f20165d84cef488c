"""QA findings (45th session), each checked against what the installed transformers does:
a yarn rope block without `factor` (and a llama3 one without its frequency factors) is
refused as transformers refuses it; a tokenizer.model folder's added tokens keep their
lstrip / rstrip / single_word flags; add_bos_token left out adds no BOS; a folder naming no
tokenizer class tokenizes as transformers' generic converter (the model's own settings);
a unigram tokenizer.model is converted."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from kiln.build import build
from kiln.config import BuildConfig
from kiln.errors import CheckpointError
from kiln.tokenizer import Tokenizer
from tests.conftest import make_hf_model
from tests.test_hf_layouts_qa44 import _train_sentencepiece as _train

F32 = BuildConfig(dtype="float32", max_seq_len=64)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny HF Llama folder (vocab 352) without tokenizer files."""
    folder = tmp_path_factory.mktemp("llama") / "hf"
    make_hf_model("llama", folder, configs={"llama": ("LlamaConfig", dict(vocab_size=352))})
    return folder


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    """BPE (330 pieces) and unigram (300) models: sentencepiece's default normalization
    (NFKC, extra spaces removed), and a BPE one with none (Llama's settings)."""
    return {"bpe": _train("bpe", 330), "unigram": _train("unigram", 300),
            "bpe-identity": _train("bpe", 330, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False)}


def _folder(llama: Path, tmp_path: Path, model: bytes, config: dict | None) -> Path:
    """The Llama folder with `model` as its only tokenizer file beside `config`
    (tokenizer_config.json; None: none)."""
    folder = shutil.copytree(llama, tmp_path / "hf")
    (folder / "tokenizer.model").write_bytes(model)
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _both(folder: Path, tmp_path: Path) -> tuple[Tokenizer, object]:
    """kiln's tokenizer of an engine built from folder, and transformers' of folder."""
    from transformers import AutoTokenizer

    engine = build(folder, tmp_path / "engine", F32, progress=False)
    return Tokenizer.from_engine(engine), AutoTokenizer.from_pretrained(folder)


def _same(ours: Tokenizer, theirs, texts: list[str]) -> None:
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text


def _token(text: str, special: bool, **flags: bool) -> dict:
    return {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special, **flags}


# ---- rope blocks transformers refuses ---------------------------------------------------------

@pytest.mark.parametrize("field, block, words", [
    ("rope_scaling", {"type": "yarn", "original_max_position_embeddings": 64},
     "type 'yarn' has no 'factor'"),
    ("rope_scaling", {"rope_type": "yarn"}, "type 'yarn' has no 'factor'"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 10000.0,
                         "original_max_position_embeddings": 64},
     "type 'yarn' has no 'factor'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
     "type 'llama3' has no 'low_freq_factor'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 64},
     "type 'llama3' has no 'high_freq_factor'"),
], ids=["yarn", "yarn-bare", "yarn-rope_parameters", "llama3-low", "llama3-high"])
def test_rope_block_without_a_required_key_is_refused(field, block, words, llama, tmp_path):
    """A yarn block without factor took max_position_embeddings / original (kiln read an
    absent factor as a null one), a llama3 one without its frequency factors 1 and 4;
    transformers' validation refuses both ("Missing required keys in `rope_parameters`")."""
    import transformers

    folder = shutil.copytree(llama, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.pop("rope_scaling", None)
    (folder / "config.json").write_text(json.dumps(
        {**config, "rope_theta": 10000.0, "max_position_embeddings": 256, field: block}))
    missing = words.split("'")[-2]
    with pytest.raises(KeyError, match=f"Missing required keys.*{missing}"):
        transformers.AutoConfig.from_pretrained(folder)
    with pytest.raises(CheckpointError, match=words) as e:
        build(folder, tmp_path / "engine", F32, progress=False)
    assert "\n" not in str(e.value) and "rope_scaling" in str(e.value)
    if "yarn" in words:
        assert "a null one is max_position_embeddings / original_max_position_embeddings" \
            in str(e.value)
    assert not (tmp_path / "engine").exists()


def test_null_yarn_factor_and_absent_longrope_factor_are_still_the_context_ratio():
    """What transformers computes, unchanged: a null yarn factor, a longrope block with
    none at all."""
    from kiln.model_config import ModelConfig

    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
            "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 100,
            "max_position_embeddings": 8192}
    yarn = {"type": "yarn", "factor": None, "original_max_position_embeddings": 2048}
    assert ModelConfig.from_hf({**base, "rope_scaling": yarn}).rope_scaling["factor"] == 4.0
    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 2048}
    assert ModelConfig.from_hf({**base, "rope_scaling": longrope}).rope_scaling["factor"] \
        == 4.0


# ---- added tokens' lstrip / rstrip / single_word -------------------------------------------

FLAGGED = {"0": _token("<unk>", True), "1": _token("<s>", True), "2": _token("</s>", True),
           "330": _token("<mask>", True, lstrip=True),
           "331": _token("<|im_start|>", True, lstrip=True, rstrip=True),
           "332": _token("<x>", False, rstrip=True), "333": _token("ab", False, single_word=True),
           "334": _token("<sw>", True, single_word=True),
           "335": _token("Hel", False, normalized=True)}
FLAGGED_TEXTS = ["Hello <mask> world", " <mask>", "x <|im_start|>  user  ", "a <x>  b",
                 "ab cab ab. xab", "a <sw> b", "a<sw>b", "Hello Hel"]


@pytest.mark.parametrize("tokenizer_class", ["LlamaTokenizer", None])
def test_added_token_flags_are_kept(tokenizer_class, models, llama, tmp_path):
    """"Hello <mask> world" kept the space before <mask> (lstrip), "a<sw>b" matched <sw>
    (single_word): the conversion added every token with its flags off."""
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "added_tokens_decoder": FLAGGED}
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    ours, theirs = _both(_folder(llama, tmp_path, models["bpe"], config), tmp_path)
    _same(ours, theirs, FLAGGED_TEXTS)
    ids = ours.encode("Hello <mask> world")
    assert ids[ids.index(330) - 1] != 297  # no "▁" before <mask>: lstrip took it
    assert 334 not in ours.encode("a<sw>b")


# ---- add_bos_token left out, and folders naming no tokenizer class ---------------------------

TEXTS = ["Hello world", " leading space", "a  b   c", "line\nnext", "naïve 日本", "  two",
         "trail  ", "the lazy dog</s> and <s>fox", ""]


@pytest.mark.parametrize("model", ["bpe", "bpe-identity"])
@pytest.mark.parametrize("config", [
    None, {}, {"tokenizer_class": "LlamaTokenizer"},
    {"tokenizer_class": "LlamaTokenizerFast", "legacy": True},
    {"tokenizer_class": "PreTrainedTokenizerFast", "legacy": False},
], ids=["no-config", "no-class", "LlamaTokenizer", "LlamaTokenizerFast-legacy",
        "PreTrainedTokenizerFast"])
def test_without_add_bos_token_no_bos_is_added(config, model, models, llama, tmp_path):
    """kiln added BOS (LlamaTokenizer's documented default, transformers 4's): transformers
    5 adds none whatever the class. A folder naming no class (or a generic one) spaced
    and normalized text as LlamaTokenizer does, not as transformers' converter (the
    model's normalizer, a "▁" before every text with legacy), and named no EOS."""
    ours, theirs = _both(_folder(llama, tmp_path, models[model], config), tmp_path)
    assert ours.encode("Hello")[0] != 1
    _same(ours, theirs, TEXTS)
    assert ours.eos_token_id == theirs.eos_token_id == 2
    assert ours.special["bos_token"] == theirs.bos_token == "<s>"


# ---- a unigram tokenizer.model ----------------------------------------------------------------

UNIGRAM_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris, France",
                 "Hello world", " leading space", "a  b   c", "line\nnext", "naïve 日本", ""]
CHATML = {"0": _token("<unk>", True), "1": _token("<s>", True), "2": _token("</s>", True),
          "300": _token("<|im_end|>", True), "301": _token("<|im_start|>", True, rstrip=True),
          "302": _token("<x>", False)}


@pytest.mark.parametrize("config", [
    None, {"add_bos_token": True, "added_tokens_decoder": CHATML, "eos_token": "<|im_end|>"},
    {"tokenizer_class": "PreTrainedTokenizerFast", "legacy": False, "add_eos_token": True},
], ids=["no-config", "chatml", "PreTrainedTokenizerFast"])
def test_unigram_tokenizer_model_tokenizes_as_transformers(config, models, llama, tmp_path,
                                                           caplog):
    """It was not converted (a warning; the engine took token ids only)."""
    import sentencepiece as spm

    folder = _folder(llama, tmp_path, models["unigram"], config)
    with caplog.at_level(logging.WARNING):
        ours, theirs = _both(folder, tmp_path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    texts = [*UNIGRAM_TEXTS, "<|im_start|>user\n<x>Hello<|im_end|>\n", "fox</s> <s>dog"]
    _same(ours, theirs, texts)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in UNIGRAM_TEXTS:  # sentencepiece's own pieces (legacy: false drops the "▁"
        if (config or {}).get("legacy", True) or not text.startswith(" "):  # before " ")
            assert ours.encode(text, add_special_tokens=False) == sp.encode(text), text
    assert ours.eos_token_id == theirs.eos_token_id


def test_unigram_model_naming_llama_tokenizer_tokenizes_as_sentencepiece(models, llama,
                                                                         tmp_path, caplog):
    """transformers 5's LlamaTokenizer builds BPE merges out of a unigram model's pieces
    (transformers 4 and its generic converter keep it unigram): kiln keeps to sentencepiece
    and says so."""
    import sentencepiece as spm

    folder = _folder(llama, tmp_path, models["unigram"], {"tokenizer_class": "LlamaTokenizer"})
    with caplog.at_level(logging.WARNING):
        engine = build(folder, tmp_path / "engine", F32, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unigram SentencePiece model" in warnings[0] \
        and "LlamaTokenizer" in warnings[0], warnings
    ours = Tokenizer.from_engine(engine)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in UNIGRAM_TEXTS[:4]:
        assert ours.encode(text) == sp.encode(text), text
        assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text


def test_cache_key_follows_tokenizer_model_and_added_tokens(models, llama, tmp_path):
    """The engine cache (kiln run FOLDER) is keyed by the files a folder without
    tokenizer.json converts its tokenizer from: replacing tokenizer.model or
    added_tokens.json builds a new engine instead of reusing the old tokenizer."""
    import os

    from kiln.checkpoint import open_checkpoint

    folder = _folder(llama, tmp_path, models["bpe"], None)
    first = open_checkpoint(folder).fingerprint()
    assert open_checkpoint(folder).fingerprint() == first
    (folder / "tokenizer.model").write_bytes(models["unigram"])
    second = open_checkpoint(folder).fingerprint()
    assert second != first
    (folder / "added_tokens.json").write_text(json.dumps({"<extra>": 400}))
    os.utime(folder / "added_tokens.json", ns=(1, 1))
    assert open_checkpoint(folder).fingerprint() != second
