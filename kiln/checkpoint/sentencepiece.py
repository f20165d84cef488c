"""Convert a SentencePiece `tokenizer.model` (older HF checkpoints ship only that) into
tokenizer.json, as transformers 5 builds it from a HF folder: a BPE one whose folder names
LlamaTokenizer (or another model's class) as that class does, through the same builder as
GGUF tokenizers; a unigram one, or a BPE one whose folder names no such class, from the
model's own settings (sentencepiece_proto); with what the folder's tokenizer_config.json,
added_tokens.json and special_tokens_map.json say, as transformers reads them."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.checkpoint.gguf_tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    TokenizerSpec,
    save_tokenizer,
    write_tokenizer,
)
from kiln.errors import CheckpointError

log = logging.getLogger(__name__)


def unconvertible_reason(model_file: Path) -> str | None:
    """Why `model_file` cannot be converted (sentencepiece missing, neither a BPE nor a
    unigram model), or None where it can."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError:
        return f"{model_file}: install sentencepiece and protobuf to convert it"
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise CheckpointError(f"{model_file} is not a SentencePiece model ({e}); is the file "
                              "damaged? re-download it") from None
    if proto.trainer_spec.model_type not in (model_pb2.TrainerSpec.BPE,
                                             model_pb2.TrainerSpec.UNIGRAM):
        kind = model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()
        return (f"{model_file} is a {kind} SentencePiece model, which kiln does not convert "
                "(BPE and unigram ones only); add the model's tokenizer.json beside it")
    return None


@dataclass
class _HFSettings:
    """What a HF folder says about its SentencePiece tokenizer."""

    specials: dict[str, str | None]  # bos / eos / pad / unk -> token, where named
    added: dict[int, tuple[str, bool]] = field(default_factory=dict)  # id -> (text, special)
    # id -> AddedToken settings (lstrip, rstrip, single_word, normalized) the file gives
    flags: dict[int, dict[str, bool]] = field(default_factory=dict)
    add_bos: bool = False  # transformers 5's default, whatever the tokenizer class
    add_eos: bool = False
    legacy: bool | None = None  # None: the class's default (LlamaTokenizer False)
    add_prefix_space: bool | None = None
    tokenizer_class: str | None = None


def convert_sentencepiece(model_file: Path, dest: Path, write_config: bool = False,
                          hf_folder: Path | None = None) -> bool:
    """Write dest/tokenizer.json for a BPE or unigram SentencePiece model; False (with a
    warning) if it cannot. hf_folder: the model folder whose tokenizer files say which
    tokens are added (and how they match), whether BOS / EOS are added and how spaces lead
    a text (transformers' rules: a space is prefixed to the text, after special tokens too
    only with legacy: true, which a unigram model's converter takes by default)."""
    reason = unconvertible_reason(model_file)
    if reason is not None:
        log.warning("%s; the engine will take token ids only", reason)
        return False
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    sp = SentencePieceProcessor(model_file=str(model_file))
    tokens, types = [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                     BYTE if sp.is_byte(i) else UNUSED if sp.is_unused(i) else
                     USER_DEFINED if proto.pieces[i].type == proto.pieces[i].USER_DEFINED
                     else NORMAL)
    scores = [sp.get_score(i) for i in range(len(tokens))]
    specials = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
    specials = {k: v if v >= 0 else None for k, v in specials.items()}
    settings = _hf_settings(hf_folder) if hf_folder is not None else None
    add_bos, add_eos = True, False
    add_space_prefix = proto.normalizer_spec.add_dummy_prefix
    if settings is not None:
        _add_tokens(tokens, types, scores, settings.added)
        first = {t: i for i, t in reversed(list(enumerate(tokens)))}
        for key, token in settings.specials.items():
            specials[key] = first.get(token) if token is not None else None
        add_bos, add_eos = settings.add_bos, settings.add_eos
        if settings.add_prefix_space is not None:
            add_space_prefix = settings.add_prefix_space
    spec = TokenizerSpec(model="llama", tokens=tokens, types=types, scores=scores,
                         specials=specials, add_bos=add_bos, add_eos=add_eos,
                         add_space_prefix=add_space_prefix)
    flags = settings.flags if settings is not None else {}
    if _from_proto(model_file, proto, settings):
        from kiln.checkpoint.sentencepiece_proto import proto_tokenizer

        added = {i: s for i, (_, s) in (settings.added if settings else {}).items()}
        legacy = settings is None or settings.legacy is not False  # transformers: True
        tok = proto_tokenizer(proto, tokens, types, scores, added, flags, legacy)
        save_tokenizer(tok, spec, dest, write_config)
    else:
        write_tokenizer(spec, dest, write_config, flags)
        if settings is not None:
            scheme = "never" if not add_space_prefix else \
                "always" if settings.legacy else "first"
            _prefix_as_transformers(dest / "tokenizer.json", scheme)
    if settings is not None and not write_config:
        _name_specials(dest / "tokenizer_config.json", settings, tokens, specials)
    return True


def _name_specials(config_file: Path, settings: _HFSettings, tokens: list[str],
                   specials: dict[str, int | None]) -> None:
    """BOS / EOS / UNK the folder's tokenizer files do not name, named in the engine's
    copy of its tokenizer_config.json by the model's pieces, as transformers takes them."""
    missing = {}
    for key in ("bos", "eos", "unk"):
        token_id = specials[key]
        if key not in settings.specials and token_id is not None:
            missing[f"{key}_token"] = tokens[token_id]
    if missing and config_file.is_file():
        config = {**_json_object(config_file), **missing}
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False),
                               encoding="utf-8")


def _from_proto(model_file: Path, proto: Any, settings: _HFSettings | None) -> bool:
    """Whether the tokenizer is built from the model's own settings: a unigram model, or
    a HF folder's BPE one naming no model-specific tokenizer class. A unigram model whose
    folder names one is built so too, with a warning: transformers 5's classes make their
    own tokenizer of its pieces (LlamaTokenizer: BPE merges, which split some words
    otherwise than sentencepiece and transformers 4 do)."""
    from kiln.checkpoint.sentencepiece_proto import GENERIC_CLASSES

    generic = settings is not None and settings.tokenizer_class in GENERIC_CLASSES
    if proto.trainer_spec.model_type != proto.trainer_spec.UNIGRAM:
        return generic
    if settings is not None and not generic:
        log.warning("%s is a unigram SentencePiece model; its tokenizer_config.json names "
                    "%s, which transformers 5 builds its own (BPE) tokenizer of, splitting "
                    "some words otherwise: kiln tokenizes as sentencepiece does", model_file,
                    settings.tokenizer_class)
    return True


def _add_tokens(tokens: list[str], types: list[int], scores: list[float],
                added: dict[int, tuple[str, bool]]) -> None:
    """Place the folder's added tokens at their ids (past the pieces: appended, any gap
    filled with unreachable placeholders, so that every id stays the one declared)."""
    for token_id in sorted(added):
        text, special = added[token_id]
        while len(tokens) <= token_id:
            tokens.append(f"<|reserved_token_{len(tokens)}|>")
            types.append(UNUSED)
            scores.append(0.0)
        tokens[token_id] = text
        types[token_id] = CONTROL if special else USER_DEFINED


def _prefix_as_transformers(path: Path, scheme: str) -> None:
    """Spaces as transformers' LlamaTokenizer spells them: Metaspace, the "▁" prefixed to
    the text where it does not start with a space ("first": only to the text's start,
    "always": after each special token too, "never")."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581",
                             "prepend_scheme": scheme, "split": False}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _hf_settings(folder: Path) -> _HFSettings:
    """transformers' reading: tokenizer_config.json's added_tokens_decoder where it has one;
    else (older exports) added_tokens.json, with special_tokens_map.json's tokens over the
    config's."""
    from kiln.tokenizer import TokenizerFileError, special_tokens

    config = _json_object(folder / "tokenizer_config.json")
    try:
        named = special_tokens(folder, config)
    except TokenizerFileError as e:
        raise CheckpointError(f"{e.path} cannot be read ({e.why}); is the file damaged? "
                              "re-download or re-export it") from None
    specials = {key: named[f"{key}_token"] for key in ("bos", "eos", "pad", "unk")
                if f"{key}_token" in config or named[f"{key}_token"] is not None}
    added: dict[int, tuple[str, bool]] = {}
    flags: dict[int, dict[str, bool]] = {}
    try:
        if "added_tokens_decoder" in config:
            for token_id, token in config["added_tokens_decoder"].items():
                added[int(token_id)] = (str(token["content"]), bool(token.get("special")))
                flags[int(token_id)] = {k: bool(token[k]) for k in _FLAGS if k in token}
        else:
            special = {t for t in named.values() if t}
            for source in (config, _json_object(folder / "special_tokens_map.json")):
                for key in ("additional_special_tokens", "extra_special_tokens"):
                    listed = source.get(key)
                    special |= {str(_token_text(t)) for t in listed or ()
                                if isinstance(listed, list)}
            for text, token_id in _json_object(folder / "added_tokens.json").items():
                added[int(token_id)] = (str(text), text in special)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{folder}: an added token in tokenizer_config.json or "
                              f"added_tokens.json is malformed ({e!r}); re-export the "
                              "tokenizer") from None
    legacy = config.get("legacy")
    return _HFSettings(
        specials=specials, added=added, flags=flags,
        add_bos=bool(config.get("add_bos_token", False)),
        add_eos=bool(config.get("add_eos_token", False)),
        legacy=None if legacy is None else bool(legacy),
        add_prefix_space=config.get("add_prefix_space"),
        tokenizer_class=config.get("tokenizer_class") or None)


_FLAGS = ("lstrip", "rstrip", "single_word", "normalized")  # an added token's AddedToken ones


def _token_text(token: Any) -> Any:
    return token.get("content") if isinstance(token, dict) else token


def _json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}); is the file damaged? "
                              "re-download or re-export it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download or re-export it")
    return data
