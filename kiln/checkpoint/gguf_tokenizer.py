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

log = logging.getLogger(__name__)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's split is llama3's with single digits.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# tokenizer.ggml.pre -> (regex llama.cpp splits words with first, whether GPT-2's regex then
# splits again). "smollm" splits off every digit, then splits the GPT-2 way.
_PRE_SPLITS: dict[str, tuple[str | None, bool]] = {
    "default": (None, True), "gpt2": (None, True), "gpt-2": (None, True),
    "smollm": (r"\p{N}", True),
    "llama3": (_LLAMA3_SPLIT, False), "llama-v3": (_LLAMA3_SPLIT, False),
    "llama-bpe": (_LLAMA3_SPLIT, False),
    "qwen2": (_QWEN2_SPLIT, False), "deepseek-r1-qwen": (_QWEN2_SPLIT, False),
}
# llama.cpp takes a whole word straight from the vocab before merging for these.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe"}


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


def write_gguf_tokenizer(reader: GGUFFile | gguf.GGUFReader, dest: Path) -> bool:
    """Write tokenizer.json and tokenizer_config.json into dest; False for unknown models."""
    model = gguf_field(reader, "tokenizer.ggml.model")
    tokens: list[str] = gguf_field(reader, "tokenizer.ggml.tokens") or []
    if model not in ("gpt2", "llama") or not tokens:
        return False
    spec = TokenizerSpec(
        model=model, tokens=tokens,
        types=gguf_field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens),
        specials={name: gguf_field(reader, f"tokenizer.ggml.{key}_token_id")
                  for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"),
                                    ("unk", "unknown"))},
        # SentencePiece models get BOS by default in llama.cpp; byte-level BPE ones do not.
        add_bos=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", model == "llama")),
        add_eos=bool(gguf_field(reader, "tokenizer.ggml.add_eos_token", False)),
        scores=gguf_field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens),
        merges=gguf_field(reader, "tokenizer.ggml.merges") or [],
        pre=gguf_field(reader, "tokenizer.ggml.pre", "default"),
        add_space_prefix=bool(gguf_field(reader, "tokenizer.ggml.add_space_prefix", True)),
        chat_template=gguf_field(reader, "tokenizer.chat_template"),
    )
    write_tokenizer(spec, dest)
    return True


def write_tokenizer(spec: TokenizerSpec, dest: Path, write_config: bool = True) -> None:
    """tokenizer.json (and, unless told not to, tokenizer_config.json) for the spec."""
    tokens, types, specials = spec.tokens, spec.types, spec.specials
    if spec.model == "gpt2":
        tok = _byte_level_bpe(tokens, spec.merges, spec.pre)
    else:
        unk = specials["unk"]
        tok = _sentencepiece_bpe(tokens, spec.scores, types,
                                 None if unk is None else tokens[unk], spec.add_space_prefix)
    # llama.cpp matches control/user-defined/unknown tokens whole in the text, so
    # "<|im_start|>" is one id. Only user-defined ones (e.g. <think>) survive skip_special.
    pairs = list(zip(tokens, types, strict=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in pairs if ty in (UNKNOWN, CONTROL)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in pairs if ty == USER_DEFINED])
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
    vocab = _vocab(tokens)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    # Drop merges that reference tokens missing from the vocab instead of failing the build.
    pairs = [(a, b) for a, b in pairs if a in vocab and b in vocab and a + b in vocab]
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES))
    if pre not in _PRE_SPLITS:
        log.warning("unknown GGUF pre-tokenizer %r; splitting words the GPT-2 way", pre)
    split, gpt2_regex = _PRE_SPLITS.get(pre, (None, True))
    steps = [] if split is None else [pre_tokenizers.Split(Regex(split), behavior="isolated")]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex))
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
