"""Rebuild a HuggingFace `tokenizers` tokenizer from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json, only llama.cpp's description of one (tokens, merges or
scores, token types, a pre-tokenizer name). We rebuild the tokenizer llama.cpp would run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from kiln.checkpoint.gguf import field as gguf_field
from kiln.checkpoint.gguf_file import GGUFFile
from kiln.checkpoint.gguf_pretok import GPT2, PRE_TOKENIZERS
from kiln.errors import CheckpointError

log = logging.getLogger(__name__)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class TokenizerSpec:
    """llama.cpp's description of a tokenizer (what a GGUF or a SentencePiece model holds)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)
    tokens: list[str]
    types: list[int]
    specials: dict[str, int | None]  # bos, eos, pad, unk -> id
    add_bos: bool
    add_eos: bool = False
    scores: list[float] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    pre: str = "default"
    add_space_prefix: bool = True
    chat_template: str | None = None


_MODELS = ("gpt2", "llama")  # the tokenizer.ggml.model values kiln converts


def no_tokenizer_reason(reader: GGUFFile | gguf.GGUFReader) -> str | None:
    """Why the file's tokenizer cannot be rebuilt (the build then takes token ids only),
    or None where it can."""
    model = gguf_field(reader, "tokenizer.ggml.model")
    if model is None or not gguf_field(reader, "tokenizer.ggml.tokens"):
        return "the GGUF carries no tokenizer (no tokenizer.ggml.tokens)"
    if model not in _MODELS:
        return (f"GGUF tokenizer model {model!r} is not supported (kiln converts "
                f"{' and '.join(_MODELS)} tokenizers)")
    return None


def read_tokenizer_spec(reader: GGUFFile | gguf.GGUFReader, name: str = "the GGUF"
                        ) -> TokenizerSpec | None:
    """The file's tokenizer metadata, checked (a CheckpointError naming the bad key,
    `name` the file's); None where there is none kiln converts (no_tokenizer_reason)."""
    if no_tokenizer_reason(reader) is not None:
        return None
    model = gguf_field(reader, "tokenizer.ggml.model")
    tokens = _strings(reader, "tokenizer.ggml.tokens", name)
    pre = gguf_field(reader, "tokenizer.ggml.pre")
    if model == "gpt2":
        if pre is None:
            log.warning("%s names no pre-tokenizer (tokenizer.ggml.pre): splitting words "
                        "the GPT-2 way, which may not be how the model was trained", name)
        elif pre not in PRE_TOKENIZERS:
            raise CheckpointError(
                f"{name} has GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre), which kiln "
                "does not know, so it cannot split text as the model does; build from the "
                "model's HF folder (with its tokenizer.json) instead. Known: "
                + ", ".join(sorted(PRE_TOKENIZERS)))
        if gguf_field(reader, "tokenizer.ggml.merges") is None:  # as llama.cpp refuses it
            raise CheckpointError(
                f"{name} has a byte-level BPE tokenizer (tokenizer.ggml.model 'gpt2') without "
                "its merges (tokenizer.ggml.merges), so it cannot split text into the model's "
                "tokens; the converter that wrote it dropped them: convert the model again, "
                "or build from its HF folder (with its tokenizer.json)")
    split = PRE_TOKENIZERS.get(pre or "default", GPT2)
    specials = {key: _token_id(reader, f"tokenizer.ggml.{k}_token_id", len(tokens), name,
                               strict=key != "pad")
                for key, k in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"),
                               ("unk", "unknown"))}
    # SentencePiece models get BOS by default in llama.cpp, and so do byte-level BPE ones
    # whose pre-tokenizer llama.cpp gives it (llama3, tekken).
    add_bos = bool(gguf_field(reader, "tokenizer.ggml.add_bos_token",
                              model == "llama" or (model == "gpt2" and split.add_bos)))
    add_eos = bool(gguf_field(reader, "tokenizer.ggml.add_eos_token", False))
    for key in ("bos", "eos"):  # as llama.cpp refuses it
        if gguf_field(reader, f"tokenizer.ggml.add_{key}_token") and specials[key] is None:
            raise CheckpointError(f"{name} sets tokenizer.ggml.add_{key}_token but has no "
                                  f"tokenizer.ggml.{key}_token_id")
    return TokenizerSpec(
        model=model, tokens=tokens,
        types=_numbers(reader, "tokenizer.ggml.token_type", len(tokens), NORMAL, name),
        specials=specials, add_bos=add_bos, add_eos=add_eos,
        scores=_numbers(reader, "tokenizer.ggml.scores", len(tokens), 0.0, name),
        merges=_strings(reader, "tokenizer.ggml.merges", name) if model == "gpt2" else [],
        pre=pre or "default",
        add_space_prefix=bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", True)),
        chat_template=gguf_field(reader, "tokenizer.chat_template"),
    )


def write_gguf_tokenizer(reader: GGUFFile | gguf.GGUFReader, dest: Path,
                         name: str = "the GGUF") -> bool:
    """Write tokenizer.json and tokenizer_config.json into dest; False where the file has
    no tokenizer kiln converts (no_tokenizer_reason says why)."""
    spec = read_tokenizer_spec(reader, name)
    if spec is None:
        return False
    write_tokenizer(spec, dest)
    return True


def _strings(reader: GGUFFile | gguf.GGUFReader, key: str, name: str) -> list[str]:
    value = gguf_field(reader, key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{name}: {key} is not a list of strings")
    return value


def _numbers(reader: GGUFFile | gguf.GGUFReader, key: str, count: int, default: Any,
             name: str) -> list[Any]:
    """One number per token (llama.cpp refuses a shorter list too)."""
    value = gguf_field(reader, key)
    if value is None:
        return [default] * count
    if not isinstance(value, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"{name}: {key} is not a list of numbers")
    if len(value) < count:
        raise CheckpointError(f"{name}: {key} has {len(value)} entries for the {count} tokens "
                              "of tokenizer.ggml.tokens; the converter that wrote it is broken")
    return value[:count]


def _token_id(reader: GGUFFile | gguf.GGUFReader, key: str, count: int, name: str,
              strict: bool) -> int | None:
    value = gguf_field(reader, key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count:
        return value
    if strict:
        raise CheckpointError(f"{name}: {key} is {value!r}, not the id of one of the {count} "
                              "tokens of tokenizer.ggml.tokens")
    log.warning("%s: %s is %r, not a token id; ignored", name, key, value)
    return None


def write_tokenizer(spec: TokenizerSpec, dest: Path, write_config: bool = True,
                    flags: dict[int, dict[str, bool]] | None = None) -> None:
    """tokenizer.json (and, unless told not to, tokenizer_config.json) for the spec.
    flags: AddedToken settings (lstrip, rstrip, single_word, normalized) by token id."""
    tokens, types, specials = spec.tokens, spec.types, spec.specials
    if spec.model == "gpt2":
        tok = _byte_level_bpe(tokens, spec.merges, spec.pre)
    else:
        unk = specials["unk"]
        tok = _sentencepiece_bpe(tokens, spec.scores, types,
                                 None if unk is None else tokens[unk], spec.add_space_prefix)
    # llama.cpp matches control/user-defined/unknown tokens whole in the text, so
    # "<|im_start|>" is one id. Only user-defined ones (e.g. <think>) survive skip_special.
    flags = flags or {}
    ids = range(min(len(tokens), len(types)))
    tok.add_special_tokens([AddedToken(tokens[i], **{"special": True, "normalized": False,
                                                     **flags.get(i, {})})
                            for i in ids if types[i] in (UNKNOWN, CONTROL)])
    tok.add_tokens([AddedToken(tokens[i], **{"special": False, "normalized": False,
                                             **flags.get(i, {})})
                    for i in ids if types[i] == USER_DEFINED])
    save_tokenizer(tok, spec, dest, write_config)


def save_tokenizer(tok: Tokenizer, spec: TokenizerSpec, dest: Path,
                   write_config: bool = True) -> None:
    """Write tok (its added tokens in place) with the spec's BOS / EOS wrapping as
    dest/tokenizer.json, and unless told not to, a tokenizer_config.json naming them."""
    tokens, specials = spec.tokens, spec.specials
    post = _post_processor(tokens, specials, spec.add_bos, spec.add_eos)
    if post is not None:
        tok.post_processor = post
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    if not write_config:
        return
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": spec.add_bos,
        "add_eos_token": spec.add_eos,
        "clean_up_tokenization_spaces": False,
    }
    for name, token_id in specials.items():
        if token_id is not None and 0 <= token_id < len(tokens):
            config[f"{name}_token"] = tokens[token_id]
    if spec.chat_template:
        config["chat_template"] = spec.chat_template
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id, as llama.cpp's lookup does
    return vocab


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> Tokenizer:
    split = PRE_TOKENIZERS.get(pre)
    if split is None:
        raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not one kiln knows")
    vocab = _vocab(tokens)
    # "a b": llama.cpp cuts at the first space after the first character.
    cuts = [(m, m.find(" ", 1)) for m in merges]
    pairs = [(m[:at], m[at + 1:]) for m, at in cuts if at > 0]
    # Drop merges that reference tokens missing from the vocab instead of failing the build.
    pairs = [(a, b) for a, b in pairs if a in vocab and b in vocab and a + b in vocab]
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=split.ignore_merges))
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in split.splits]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split.gpt2))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int],
                       unk: str | None, add_space_prefix: bool) -> Tokenizer:
    vocab = _vocab(tokens)
    tok = Tokenizer(models.BPE(vocab, _merges_from_scores(vocab, scores, types), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    # llama.cpp prefixes a space to every run of text (also after a special token), as
    # the per-segment Prepend normalizer does, then spells spaces as U+2581.
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", "\u2581")]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    dec: list[decoders.Decoder] = [decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                   decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _merges_from_scores(vocab: dict[str, int], scores: list[float],
                        types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose union has the best score.

    As ranked BPE merges: every split of a normal token into two vocab pieces, ranked by
    the token's score (best first), ties by token id for a stable order.
    """
    ranked: list[tuple[float, int, str, str]] = []
    for token, i in vocab.items():
        if types[i] != NORMAL:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _post_processor(tokens: list[str], specials: dict[str, int | None], add_bos: bool,
                    add_eos: bool) -> processors.PostProcessor | None:
    """BOS/EOS wrapping in tokenizer.json, so a plain `Tokenizer.encode(text)` adds them."""
    bos, eos = specials["bos"], specials["eos"]
    head = [(tokens[bos], bos)] if add_bos and bos is not None else []
    tail = [(tokens[eos], eos)] if add_eos and eos is not None else []
    if not head and not tail:
        return None
    h, t = [s for s, _ in head], [s for s, _ in tail]
    return processors.TemplateProcessing(
        single=[*h, "$A", *t],
        pair=[*h, "$A", *t, *(f"{s}:1" for s in h), "$B:1", *(f"{s}:1" for s in t)],
        special_tokens=list(dict.fromkeys(head + tail)),
    )
