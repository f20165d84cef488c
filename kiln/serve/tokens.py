"""Token ids as the OpenAI API shows them in logprobs: a string and its exact bytes.

A byte-level BPE token can hold part of a UTF-8 character, which decodes to U+FFFD on
its own. Its exact bytes come from the vocabulary piece (GPT-2's byte-to-unicode map, or
SentencePiece's <0xNN> byte tokens); such a token is shown as "bytes:\\xe4\\xb8", the
way other OpenAI-compatible servers do.
"""

from __future__ import annotations

import re

from kiln.tokenizer import Tokenizer

_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest
    to code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_UNICODE_TO_BYTE = _gpt2_unicode_to_byte()


class TokenTexts:
    """token id -> (display string, UTF-8 bytes), cached."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._compute(token_id)
        return found

    def text(self, token_id: int) -> str:
        return self(token_id)[0]

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        if self.tokenizer is None:
            return f"token_id:{token_id}", []
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text, list(text.encode())
        raw = self._piece_bytes(token_id)
        if raw is None:
            return text, list(text.encode())
        try:
            return raw.decode(), list(raw)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)

    def _piece_bytes(self, token_id: int) -> bytes | None:
        piece = self.tokenizer.tok.id_to_token(token_id) if self.tokenizer else None
        if piece is None:
            return None
        match = _SP_BYTE.match(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        if all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        return None
