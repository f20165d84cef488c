"""Tokenizer (HF `tokenizers` + jinja chat template) and incremental detokenization."""

from __future__ import annotations

import datetime
import functools
import json
import os
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, RequestError


class TokenizerFileError(KilnError):
    """A tokenizer file that cannot be read: `path` is the file, the message one line."""

    def __init__(self, path: Path, why: object) -> None:
        self.path, self.why = path, " ".join(str(why).split()) or type(why).__name__
        super().__init__(f"{path} cannot be read ({self.why}): the engine's tokenizer file is "
                         "damaged; rebuild the engine from a good copy of the model")


class Tokenizer:
    """Wraps tokenizer.json; reads special tokens and the chat template from its config."""

    def __init__(self, folder: Path) -> None:
        """A TokenizerFileError (one line naming the file) where a file is not one that
        `tokenizers` (tokenizer.json) or JSON (the configs) can read."""
        from tokenizers import Tokenizer as HFTokenizer

        self.folder = folder
        try:
            self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises Exception ("Model missing.", serde's)
            raise TokenizerFileError(folder / "tokenizer.json", e) from None
        config = _read_json(folder / "tokenizer_config.json")
        if not isinstance(config, dict):
            raise TokenizerFileError(folder / "tokenizer_config.json", "not a JSON object")
        # Named templates (tokenizer_config.json's list): "default", and "tool_use" for
        # requests with tools, as transformers picks them.
        self.chat_templates = _chat_templates(folder, config)
        self.chat_template = self.chat_templates.get("default")
        self.special = special_tokens(folder, config)
        self.eos_token_id = self.token_to_id(self.special["eos_token"])
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_engine(cls, engine_dir: Path) -> Tokenizer | None:
        folder = engine_dir / "tokenizer"
        return cls(folder) if (folder / "tokenizer.json").is_file() else None

    def token_to_id(self, token: str | None) -> int | None:
        return self.tok.token_to_id(token) if token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # tokenizers takes valid Unicode only
            at = lone_surrogate(text) if isinstance(text, str) else None
            if at is None:
                raise
            raise RequestError(f"the text {not_unicode(text, at)}") from None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True,
                            continue_final_message: bool = False, **extra: Any) -> str:
        """The conversation as the model's template writes it. continue_final_message: the
        text ends where the last message's content does (its end-of-turn left out, as
        transformers cuts it), for the model to go on with it."""
        text = self._render(messages, add_generation_prompt, **extra)
        if not continue_final_message:
            return text
        final = _plain_message(messages[-1], len(messages) - 1)["content"]
        at = text.rfind(final.strip())
        if not final.strip() or at < 0:
            raise RequestError("continue_final_message: the chat template does not write the "
                               "last message's text, so there is nothing to continue")
        whole = final.lstrip()  # its trailing whitespace too, where the template kept it
        return text[:at + (len(whole) if text[at:at + len(whole)] == whole
                           else len(final.strip()))]

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                **extra: Any) -> str:
        template = self.chat_templates.get("tool_use") \
            if extra.get("tools") is not None else None
        template = template or self.chat_template
        if not template:
            raise RequestError("this model has no chat template; send a plain prompt instead")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise RequestError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols",
                                                        _generation_extension()])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        if not messages:  # transformers refuses it too
            raise RequestError("messages must hold at least one message, e.g. "
                               "[{'role': 'user', 'content': 'Hello'}]")
        messages = [_plain_message(m, i) for i, m in enumerate(messages)]
        # As transformers: tools and documents always defined (None where not given), the
        # caller's variables over the special tokens.
        variables = {**{k: v or "" for k, v in self.special.items()},
                     "tools": None, "documents": None, **extra,
                     "messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            return env.from_string(template).render(**variables)
        except RequestError:
            raise
        except Exception as e:  # the template's own errors: 1 / 0, range(10**9), recursion
            raise RequestError(f"chat template failed: {type(e).__name__}: {e}") from None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' tojson: JSON as json.dumps writes it (no HTML escapes), with its
    options, in its order (a bare positional argument is ensure_ascii)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


@functools.cache
def _generation_extension() -> type:
    """`{% generation %}...{% endgeneration %}` (transformers marks the assistant's
    tokens with it, for training): renders what it holds."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    return Generation


def _plain_message(message: Any, index: int) -> dict[str, Any]:
    """A message as chat templates read it: OpenAI-style content parts ([{"type": "text",
    "text": ...}]) joined into one string (as the server does), None content as ""."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RequestError(f"messages[{index}] must be a dict with a role and content, "
                           f"e.g. {{'role': 'user', 'content': 'Hello'}}")
    content = message.get("content")
    # Other keys whose value is None are left out, as transformers does: templates test
    # `'tool_calls' in message` or `message.tool_calls is defined`, then loop over it.
    message = {k: v for k, v in message.items() if v is not None}
    if content is None or isinstance(content, str):
        return {**message, "content": content or ""}
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return {**message, "content": "\n".join(p["text"] for p in content)}
    raise RequestError(f"messages[{index}].content must be a string or a list of text parts "
                       "({'type': 'text', 'text': ...}); only text is supported")


def lone_surrogate(text: str) -> int | None:
    """Where `text` holds a lone surrogate, or None. A JSON escape (\\ud800) can put one in
    a string; it is not valid Unicode, so it has no UTF-8 and no tokenizer takes it."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def not_unicode(text: str, at: int) -> str:
    """The end of the message for a lone surrogate at `at` (it names the code point, never
    the text: a message holding it could not be sent as UTF-8 either)."""
    return (f"is not valid Unicode: it holds a lone surrogate, U+{ord(text[at]):04X} at "
            f"character {at}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError too
        raise TokenizerFileError(path, e) from None


SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def special_tokens(folder: Path, config: dict[str, Any]) -> dict[str, str | None]:
    """BOS / EOS / PAD / UNK as transformers reads them: from tokenizer_config.json (config);
    where it has no added_tokens_decoder (exports before transformers 4.34),
    special_tokens_map.json's tokens come over its own."""
    special = {k: _token_str(config.get(k)) for k in SPECIAL_TOKENS}
    if "added_tokens_decoder" not in config:
        mapped = _read_json(folder / "special_tokens_map.json")
        if not isinstance(mapped, dict):
            raise TokenizerFileError(folder / "special_tokens_map.json", "not a JSON object")
        special.update({k: _token_str(mapped[k]) for k in SPECIAL_TOKENS if k in mapped})
    return special


def _token_str(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _chat_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return {"default": jinja.read_text(encoding="utf-8")}
        except (OSError, ValueError) as e:
            raise TokenizerFileError(jinja, e) from None
    template = config.get("chat_template")
    if not template:
        data = _read_json(folder / "chat_template.json")
        if not isinstance(data, dict):
            raise TokenizerFileError(folder / "chat_template.json", "not a JSON object")
        template = data.get("chat_template")
    if isinstance(template, list):  # named templates
        return {t["name"]: t["template"] for t in template if isinstance(t, dict)
                and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)}
    return {"default": template} if template else {}


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character.

    Each new token is decoded together with a few tokens before it, so that tokenizers
    whose pieces depend on context (SentencePiece's leading space, byte-level BPE's
    partial UTF-8 sequences) give the same text as decoding everything at once.

    The same rule runs inside `tokenizers` (its DecodeStream, primed with the prompt's last
    tokens: ~1 us a token against ~5.7 for two Python decode calls, SmolLM2's tokenizer),
    except where the prompt's tail ends inside a UTF-8 sequence (a prompt of token ids),
    and from any token the stream refuses on: this class's own decodes then go on, with
    the offsets both keep.
    """

    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # SentencePiece's byte fallback spells a whole run of byte tokens as U+FFFDs where
        # it is not valid UTF-8: a tail that starts inside a character (its <0x80>-<0xBF>
        # bytes) takes the tokens before it, up to 3, so that the run it begins is whole.
        start = max(0, len(prompt_ids) - self.CONTEXT)
        while start > 0 and len(prompt_ids) - start < self.CONTEXT + 3 and \
                _continuation_byte(tokenizer, prompt_ids[start]):
            start -= 1
        self.ids = list(prompt_ids[start:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        # A tail that ends inside a character: its text up to that character (byte
        # fallback spells all of a run that ends unfinished as U+FFFDs).
        self._whole = None
        if tokenizer.decode(self.ids, skip_special_tokens).endswith("\ufffd"):
            for end in range(len(self.ids) - 1, max(-1, len(self.ids) - 5), -1):
                text = tokenizer.decode(self.ids[:end], skip_special_tokens)
                if not text.endswith("\ufffd"):
                    self._whole = text
                    break
        self._stream = _decode_stream(tokenizer, self.ids, skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (maybe empty)."""
        self.ids.append(token_id)
        if self._stream is not None:
            try:
                delta = self._stream.step(self.tokenizer.tok, token_id)
            except Exception:  # the stream's prefix check: this class decodes from here
                self._stream = None
            else:
                if not delta:
                    return ""
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                self.text += delta
                return delta
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        after = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if after.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        # Where the prompt ended inside a character, `before` ends with the U+FFFD that
        # `after` now spells as the character: the delta starts where they part (or where
        # the prompt's whole characters end, byte fallback's U+FFFDs spelling more).
        common = len(os.path.commonprefix([before, after]))
        if self._whole is not None and after.startswith(self._whole):
            common = max(common, len(self._whole))
        delta = after[common:]
        if not delta:
            return ""
        if not before.endswith("\ufffd"):  # else the character began before read_offset:
            self.prefix_offset = self.read_offset  # the next window starts with it whole
        self.read_offset, self._whole = len(self.ids), None
        self.text += delta
        return delta


def _continuation_byte(tokenizer: Tokenizer, token_id: int) -> bool:
    """Whether the token is a byte-fallback piece of a UTF-8 continuation byte."""
    tok = getattr(tokenizer, "tok", None)
    piece = tok.id_to_token(token_id) if tok is not None else None
    return piece is not None and len(piece) == 6 and piece.startswith("<0x") and \
        piece.endswith(">") and piece[3] in "89AB"


def _decode_stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool) -> Any:
    """A `tokenizers` DecodeStream primed with ids, or None (a tokenizers without one, a
    prompt tail that ends inside a character: the stream would emit the prompt's bytes)."""
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    if getattr(tokenizer, "tok", None) is None or \
            tokenizer.decode(ids, skip_special_tokens).endswith("\ufffd"):
        return None
    try:
        return DecodeStream(ids=ids, skip_special_tokens=skip_special_tokens)
    except TypeError:  # before tokenizers 0.22: no priming
        return None
