"""HuggingFace folder reader: config.json + safetensors (single or sharded) or .bin."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from kiln.checkpoint.base import Checkpoint
from kiln.checkpoint.hf_defaults import token_ids
from kiln.config import ModelConfig
from kiln.errors import CheckpointError

log = logging.getLogger(__name__)

# Files copied into the engine's tokenizer/ folder when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "chat_template.jinja", "chat_template.json",
)
# What a folder without tokenizer.json is converted from: part of its engines' cache key, as
# is the conversion's version (raised when kiln converts such a folder differently, so that
# cached engines do not keep an older tokenizer).
SENTENCEPIECE_FILES = ("tokenizer.model", "added_tokens.json")
SENTENCEPIECE_CONVERSION = 2


class HFCheckpoint(Checkpoint):
    def __init__(self, folder: Path) -> None:
        self.source = folder
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{folder} has no config.json; is it a HuggingFace model folder?")
        hf_config = _json_object(config_path, "config fields")
        self.hf_config = hf_config  # build/ reads quantization_config from it
        self.config = ModelConfig.from_hf(hf_config)
        # Chat models often list their end-of-turn token only in generation_config.json.
        generation = folder / "generation_config.json"
        if generation.is_file():
            eos = token_ids(_json_object(generation, "generation settings"), "eos_token_id",
                            generation.name)
            merged = tuple(dict.fromkeys([*self.config.eos_token_ids, *eos]))
            self.config = dataclasses.replace(self.config, eos_token_ids=merged)
        self._files = self._weight_files()
        self.origins: dict[str, str] = {}
        held = [(n, f) for f in self._files if f.suffix == ".safetensors"
                for n in _safetensors_header(f)]
        self._names = [n for n, _ in held]
        self._file_of = dict(held)
        self._head_as_embedding: str | None = None  # a tied head's tensor, read as both
        if self.config.tie_word_embeddings:
            self._settle_tied_head()

    def _settle_tied_head(self) -> None:
        """A head tied to the embedding (tie_word_embeddings) as transformers (5) loads it:
        the embedding read from the head's tensor where the checkpoint holds only that
        (safetensors' save_model keeps lm_head.weight of the two), untied where it holds
        both with different values. Known from safetensors headers (.bin: tied as is)."""
        from kiln.models.convert import decoder_name

        found = {decoder_name(self.config, n): n for n in self._names}
        head, embed = found.get("lm_head.weight"), found.get("model.embed_tokens.weight")
        if head is None or embed is None:
            self._head_as_embedding = head
            return
        head_values, embed_values = self._read(head), self._read(embed)
        if head_values.shape != embed_values.shape or not torch.equal(head_values,
                                                                      embed_values):
            log.warning("config.json ties the LM head to the embedding (tie_word_embeddings) "
                        "but %s holds a %s that differs from %s: kept apart, as transformers "
                        "does; set tie_word_embeddings to false in config.json to say so",
                        self.source, head, embed)
            self.config = dataclasses.replace(self.config, tie_word_embeddings=False)

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._file_of[name]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path.name} is truncated or corrupt: {e}") from None

    def _weight_files(self) -> list[Path]:
        """The files transformers would load, in its order: model.safetensors, the shards
        of model.safetensors.index.json, pytorch_model.bin, the shards of
        pytorch_model.bin.index.json; else every *.safetensors (shards without an index),
        else every pytorch_model*.bin."""
        for name in ("model.safetensors", "model.safetensors.index.json",
                     "pytorch_model.bin", "pytorch_model.bin.index.json"):
            path = self.source / name
            if path.is_file():
                return self._shards(path) if name.endswith(".json") else [path]
        found = sorted(p for p in self.source.glob("*.safetensors") if p.is_file())
        if found:
            return found
        found = sorted(p for p in self.source.glob("pytorch_model*.bin") if p.is_file())
        if found:
            return found
        raise CheckpointError(
            f"{self.source} has no weights: expected model.safetensors, a sharded "
            "model.safetensors.index.json, or pytorch_model.bin")

    def _shards(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.source / f for f in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is malformed: {e}") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{index.name} lists shard(s) that are missing: {', '.join(missing)}")
        return files

    @property
    def weight_files(self) -> list[str]:
        """The names of the files the weights are read from."""
        return [f.name for f in self._files]

    def tensor_names(self) -> list[str]:
        """The tensors' names, read from safetensors headers ([] for .bin files)."""
        return list(self._names)

    def num_tensors(self) -> int:
        return len(self._names) if self._names else len(self._files)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the weight files; origins[name] says which file it came from."""
        for path in self._files:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    with safe_open(str(path), framework="pt") as f:
                        for name in f.keys():
                            self.origins[name] = path.name
                            tensor = f.get_tensor(name)
                            if name == self._head_as_embedding:  # (under the name every
                                name = "model.embed_tokens.weight"  # family reads as is)
                                self.origins[name] = path.name
                            yield name, tensor
                except Exception as e:  # safetensors raises its own error types
                    raise CheckpointError(f"{path.name} is truncated or corrupt: {e}") from None
            else:
                try:  # torch.save's format before PyTorch 1.6 (not a zip) cannot be mapped
                    state = torch.load(path, map_location="cpu", weights_only=True,
                                       mmap=zipfile.is_zipfile(path))
                except Exception as e:
                    raise CheckpointError(f"{path.name} could not be loaded: {_why(e)}; kiln "
                                          "reads tensors only (torch.load weights_only): if "
                                          "the file is whole, convert it to safetensors"
                                          ) from None
                self.origins.update(dict.fromkeys(state, path.name))
                yield from state.items()

    def write_tokenizer(self, dest: Path) -> bool:
        copied = False
        for name in TOKENIZER_FILES:
            src = self.source / name
            if src.is_file():
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
                copied = copied or name == "tokenizer.json"
        model_file = self.source / "tokenizer.model"
        if not copied and model_file.is_file():
            from kiln.checkpoint.sentencepiece import convert_sentencepiece, unconvertible_reason

            # The build's warning says why the engine takes token ids only.
            self.no_tokenizer_reason = unconvertible_reason(model_file)
            if self.no_tokenizer_reason is None:
                copied = convert_sentencepiece(
                    model_file, dest, hf_folder=self.source,
                    write_config=not (dest / "tokenizer_config.json").is_file())
        return copied

    def fingerprint(self) -> str:
        h = hashlib.sha256(str(self.source.resolve()).encode())
        tokenizer = [self.source / n for n in (*TOKENIZER_FILES, *SENTENCEPIECE_FILES)
                     if (self.source / n).is_file()]
        if (self.source / "tokenizer.model").is_file() and \
                not (self.source / "tokenizer.json").is_file():
            h.update(f"sentencepiece conversion {SENTENCEPIECE_CONVERSION}".encode())
        for path in [self.source / "config.json", *self._files, *tokenizer]:
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def _safetensors_header(path: Path) -> list[str]:
    """Tensor names from a safetensors header, checking the file is not truncated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header length exceeds file size")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        ends = {name: info["data_offsets"][1] for name, info in header.items()
                if name != "__metadata__"}
        if not all(isinstance(end, int) for end in ends.values()):
            raise ValueError("a tensor's data_offsets are not whole numbers")
    except (struct.error, ValueError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{path.name} is truncated or corrupt: {e}") from None
    except (KeyError, TypeError, IndexError) as e:  # an entry without [start, end] offsets
        raise CheckpointError(f"{path.name} is corrupt: its header holds an entry without "
                              f"data_offsets ({type(e).__name__}: {e})") from None
    data_size = size - 8 - header_len
    names = []
    for name, end in ends.items():
        if end > data_size:
            raise CheckpointError(
                f"{path.name} is truncated: tensor {name} ends at byte {end} of the data "
                f"section but the file holds only {data_size}; re-download it")
        names.append(name)
    return names


def _json_object(path: Path, what: str) -> dict:
    """A JSON file's object, or a CheckpointError saying what is wrong with the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object of {what}")
    return data


def _why(e: Exception) -> str:
    """One line of torch.load's error (its weights_only text runs over many lines, the
    cause after "WeightsUnpickler error:")."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {line[:200]}" if line else type(e).__name__
