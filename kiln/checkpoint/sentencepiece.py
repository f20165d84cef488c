"""Convert a SentencePiece BPE `tokenizer.model` (older HF checkpoints ship only that)
into tokenizer.json, through the same builder as GGUF tokenizers."""

from __future__ import annotations

import logging
from pathlib import Path

from kiln.checkpoint.gguf_tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    TokenizerSpec,
    write_tokenizer,
)

log = logging.getLogger(__name__)


def convert_sentencepiece(model_file: Path, dest: Path, write_config: bool = False) -> bool:
    """Write dest/tokenizer.json for a BPE SentencePiece model; False if it cannot."""
    try:
        from sentencepiece import SentencePieceProcessor
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError:
        log.warning("%s: install sentencepiece and protobuf to convert it; the engine will "
                    "take token ids only", model_file)
        return False
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if proto.trainer_spec.model_type != model_pb2.TrainerSpec.BPE:
        log.warning("%s is not a BPE SentencePiece model (unigram is not converted yet); the "
                    "engine will take token ids only", model_file)
        return False
    sp = SentencePieceProcessor(model_file=str(model_file))
    tokens, types = [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                     BYTE if sp.is_byte(i) else UNUSED if sp.is_unused(i) else
                     USER_DEFINED if proto.pieces[i].type == proto.pieces[i].USER_DEFINED
                     else NORMAL)

    def special(i: int) -> int | None:
        return i if i >= 0 else None

    spec = TokenizerSpec(
        model="llama", tokens=tokens, types=types,
        scores=[sp.get_score(i) for i in range(len(tokens))],
        specials={"bos": special(sp.bos_id()), "eos": special(sp.eos_id()),
                  "pad": special(sp.pad_id()), "unk": special(sp.unk_id())},
        add_bos=True, add_space_prefix=proto.normalizer_spec.add_dummy_prefix)
    write_tokenizer(spec, dest, write_config)
    return True
