"""GGUF QA findings (62nd session): a byte-level BPE tokenizer whose merges were dropped
by its converter, and a tensor type number the gguf package does not know, each one
clear line instead of a silently wrong tokenizer or a "truncated or corrupt" file."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import pytest

from kiln.errors import CheckpointError
from tests.test_gguf import _error, _hf_state, _write
from tests.test_gguf_qa43 import _bpe_meta


def test_bpe_tokenizer_without_merges_is_refused(tmp_path: Path) -> None:
    """tokenizer.ggml.model "gpt2" without tokenizer.ggml.merges (a converter that drops
    string arrays writes it): llama.cpp refuses the file ("cannot find tokenizer merges");
    kiln built a tokenizer that spelled every word letter by letter (wrong ids, garbage
    text) with no word said."""
    from kiln.build import build
    from kiln.checkpoint.gguf_file import GGUFFile
    from kiln.checkpoint.gguf_tokenizer import write_gguf_tokenizer
    from kiln.config import BuildConfig

    meta = _bpe_meta("smollm")
    del meta["tokenizer.ggml.merges"]
    path = tmp_path / "nomerges.gguf"
    _write(path, _hf_state("llama"), meta=meta)
    message = _error(path)
    assert "nomerges.gguf" in message and "tokenizer.ggml.merges" in message
    with pytest.raises(CheckpointError, match="tokenizer.ggml.merges"):
        write_gguf_tokenizer(GGUFFile(path), tmp_path / "tok")
    with pytest.raises(CheckpointError, match="tokenizer.ggml.merges"):
        build(path, tmp_path / "e", BuildConfig(dtype="float32", max_seq_len=64),
              progress=False)
    assert not (tmp_path / "e").exists()


def _set_type(path: Path, tensor: bytes, qtype: int) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(tensor) + len(tensor)  # then: dims u32, dims x u64, type u32
    (dims,) = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at + 4 + 8 * dims, qtype)
    path.write_bytes(bytes(data))


def test_an_unknown_tensor_type_is_named(tmp_path: Path) -> None:
    """A tensor type newer than the installed gguf package (a number it has no name for)
    said the file "is truncated or corrupt: 99 is not a valid GGMLQuantizationType",
    sending the user to re-download a good file; it is named as a type kiln cannot read,
    as the known types kiln does not read are."""
    path = tmp_path / "new.gguf"
    _write(path, _hf_state("llama"), gguf.GGMLQuantizationType.Q8_0)
    _set_type(path, b"blk.0.ffn_down.weight", 99)
    message = _error(path)
    assert "truncated" not in message and "corrupt" not in message
    assert "new.gguf: tensor blk.0.ffn_down.weight has type 99" in message
    assert "supported: " in message and "Q4_K" in message
