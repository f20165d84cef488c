"""A SentencePiece `tokenizer.model` (BPE or unigram) as a `tokenizers` tokenizer, built as
transformers 5 builds one for a folder with no tokenizer.json that names no model-specific
tokenizer class (SpmConverter.build_tokenizer_from_spm_proto, for AutoTokenizer's
TokenizersBackend): it follows the model's own normalizer spec, so it encodes as
`SentencePieceProcessor.encode` does. kiln builds every unigram model this way."""

from __future__ import annotations

import re
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers as pre

from kiln.checkpoint.gguf_tokenizer import CONTROL, UNKNOWN

# ModelProto.SentencePiece.Type values: what transformers' builder and sentencepiece key on.
_NORMAL, _USER_DEFINED = 1, 4
# tokenizer_config.json's tokenizer_class values AutoTokenizer builds this way
GENERIC_CLASSES = (None, "PreTrainedTokenizerFast", "TokenizersBackend")


def proto_tokenizer(proto: Any, tokens: list[str], types: list[int], scores: list[float],
                    added: dict[int, bool], flags: dict[int, dict[str, bool]],
                    legacy: bool) -> Tokenizer:
    """The tokenizer for `proto` (a sentencepiece ModelProto).

    tokens / types / scores: the pieces with the folder's added tokens in place (ids past
    the pieces appended, gaps filled); added: the folder's added tokens, id -> special;
    flags: their AddedToken settings; legacy: a "▁" starts every text between added
    tokens (transformers' default for such a folder), else only the text's start."""
    pieces = len(proto.pieces)
    spec = proto.normalizer_spec
    byte_fallback = proto.trainer_spec.byte_fallback
    user = [tokens[i] for i, p in enumerate(proto.pieces) if p.type == _USER_DEFINED]
    if proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM:
        model: models.Model = models.Unigram(
            [(tokens[i], scores[i]) for i in range(pieces)],
            unk_id=proto.trainer_spec.unk_id, byte_fallback=byte_fallback)
    else:
        vocab = {tokens[i]: i for i in range(pieces)}
        model = models.BPE(vocab, _merges(proto, tokens), unk_token=proto.trainer_spec.unk_piece,
                           fuse_unk=True, byte_fallback=byte_fallback, ignore_merges=bool(user))
    tok = Tokenizer(model)
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # spaces only: newlines stay, as in sentencepiece
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    if spec.add_dummy_prefix and legacy:  # Metaspace adds none to a text starting with "▁"
        steps.append(normalizers.Replace(Regex("\\A\u2581"), "\u2581\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    splits: list[pre.PreTokenizer] = []
    if spec.add_dummy_prefix:
        splits.append(pre.Metaspace(replacement="\u2581", split=False,
                                    prepend_scheme="always" if legacy else "first"))
    if user:  # sentencepiece emits user-defined pieces whole, after the dummy prefix
        pattern = "|".join(map(re.escape, sorted(set(user), key=len, reverse=True)))
        splits.append(pre.Split(Regex(pattern), behavior="isolated"))
    if splits:
        tok.pre_tokenizer = pre.Sequence(splits)
    steps_out: list[decoders.Decoder] = [decoders.Replace("\u2581", " ")]
    if byte_fallback:
        steps_out.append(decoders.ByteFallback())
    if spec.add_dummy_prefix:
        steps_out += [decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    elif byte_fallback:
        steps_out.append(decoders.Fuse())
    tok.decoder = decoders.Sequence(steps_out)
    _add_tokens(tok, tokens, types, pieces, added, flags, bool(spec.add_dummy_prefix))
    return tok


def _merges(proto: Any, tokens: list[str]) -> list[tuple[str, str]]:
    """BPE merges from the pieces' scores: every split of a normal piece into two normal
    pieces, the best-scored piece first (ties by id)."""
    normal = {tokens[i]: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = [(-score, i, piece[:cut], piece[cut:]) for piece, (score, i) in normal.items()
              for cut in range(1, len(piece)) if piece[:cut] in normal and piece[cut:] in normal]
    return [(left, right) for _, _, left, right in sorted(ranked)]


def _add_tokens(tok: Tokenizer, tokens: list[str], types: list[int], pieces: int,
                added: dict[int, bool], flags: dict[int, dict[str, bool]],
                dummy_prefix: bool) -> None:
    """The control and unknown pieces as special tokens, the folder's added tokens as it
    says, matched in the raw text (a "▁" then starts the text after them). Those past the
    pieces stay out of the model's vocab (a unigram one would let them win inside other
    text), so they go in id order: `tokenizers` numbers them on from the pieces."""
    for i in range(len(tokens)):
        if i < pieces and i not in added and types[i] not in (UNKNOWN, CONTROL):
            continue
        special = added.get(i, i >= pieces or types[i] in (UNKNOWN, CONTROL))
        settings = {"special": special, "normalized": False, **flags.get(i, {})}
        if dummy_prefix and added:  # as transformers: the raw text, whatever the file says
            settings["normalized"] = False
        entry = AddedToken(tokens[i], **settings)
        # one by one: each past the pieces takes the next id
        (tok.add_special_tokens if special else tok.add_tokens)([entry])
