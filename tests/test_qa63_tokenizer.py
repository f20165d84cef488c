"""Tokenizer QA findings (63rd session), each checked against what the installed
transformers does on the same files: chat templates see `tojson`'s options, `tools` and
`documents` defined as None, no None-valued message keys, the caller's variables over the
special tokens, `{% generation %}` blocks; a template's own error (1 / 0, a range too big)
is a RequestError, not a traceback; streaming after a prompt whose tail cuts a character
spelled by SentencePiece byte-fallback tokens gives that character, not U+FFFDs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from kiln.errors import RequestError
from kiln.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.test_detokenize import streamed_text
from tests.test_hf_layouts_qa44 import _train_sentencepiece

USER = [{"role": "user", "content": "héllo"}]


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (byte-level BPE, ChatML tokens) from the GGUF file."""
    from kiln.checkpoint.gguf_file import GGUFFile
    from kiln.checkpoint.gguf_tokenizer import write_gguf_tokenizer
    from tests.conftest import smollm2_gguf

    folder = tmp_path_factory.mktemp("smol") / "tok"
    assert write_gguf_tokenizer(GGUFFile(smollm2_gguf()), folder)
    return folder


def _both(byte_level: Path, tmp_path: Path, template: str | list) -> tuple[Tokenizer, object]:
    """kiln's and transformers' tokenizers of byte_level's files with `template`."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    shutil.copytree(byte_level, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config,
                                                              "chat_template": template}))
    return Tokenizer(folder), AutoTokenizer.from_pretrained(folder)


def _render(ours: Tokenizer, theirs, messages: list, **extra) -> tuple[str, str]:
    return (ours.apply_chat_template(messages, True, **extra),
            theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                       **extra))


@pytest.mark.parametrize("template", [
    "{{ messages|tojson(ensure_ascii=True) }}",
    "{{ messages|tojson(separators=(',', ':')) }}",
    "{{ {'b': 1, 'a': 2}|tojson(sort_keys=True) }}",
    "{{ messages|tojson(indent=2) }}",
    "{{ messages|tojson(True) }}",
], ids=["ensure_ascii", "separators", "sort_keys", "indent", "positional"])
def test_tojson_takes_transformers_options(template, byte_level, tmp_path):
    """ensure_ascii, separators and sort_keys were dropped (kiln wrote "héllo" where
    transformers writes "h\\u00e9llo", ", " for ",", keys unsorted)."""
    ours, theirs = _both(byte_level, tmp_path, template)
    got, want = _render(ours, theirs, USER)
    assert got == want


TOOLS_TEMPLATE = ("{% if tools is not none %}[tools {{ tools|length }}]{% endif %}"
                  "{% if documents is not none %}[docs]{% endif %}"
                  "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")


def test_tools_and_documents_are_none_when_not_given(byte_level, tmp_path):
    """Not given, `tools is not none` was true (tools undefined): kiln wrote the tools
    block of a template (tools|length failed: "object of type 'Undefined' has no len")."""
    ours, theirs = _both(byte_level, tmp_path, TOOLS_TEMPLATE)
    got, want = _render(ours, theirs, USER)
    assert got == want == "user: héllo\n"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    got, want = _render(ours, theirs, USER, tools=tools, documents=[{"title": "t", "text": "x"}])
    assert got == want and got.startswith("[tools 1][docs]")


CALLS_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}"
                  "{% if m.tool_calls is defined %}{% for c in m.tool_calls %}"
                  "<call>{{ c.function.name }}</call>{% endfor %}{% endif %}"
                  "{% if 'name' in m %}({{ m.name }}){% endif %}\n{% endfor %}")


def test_none_valued_message_keys_are_left_out(byte_level, tmp_path):
    """{"tool_calls": None} (OpenAI clients' assistant messages) failed: "chat template
    failed: 'NoneType' object is not iterable"; transformers leaves None keys out."""
    ours, theirs = _both(byte_level, tmp_path, CALLS_TEMPLATE)
    call = {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    messages = [*USER, {"role": "assistant", "content": "ok", "tool_calls": None, "name": None},
                {"role": "assistant", "content": "", "tool_calls": [call]}]
    got, want = _render(ours, theirs, messages)
    assert got == want == "user: hélloassistant: okassistant: <call>f</call>"


def test_callers_variables_go_over_the_special_tokens(byte_level, tmp_path):
    """chat_template_kwargs naming bos_token failed: "render() got multiple values for
    keyword argument 'bos_token'"; transformers lets the caller's value win."""
    ours, theirs = _both(byte_level, tmp_path, "{{ bos_token }}|{{ eos_token }}|{{ x }}")
    got, want = _render(ours, theirs, USER, bos_token="<B>", x=1)
    assert got == want == "<B>|<|im_end|>|1"


def test_generation_blocks_render(byte_level, tmp_path):
    """Templates made for training mark the assistant's turns with {% generation %}:
    kiln refused them ("Encountered unknown tag 'generation'")."""
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
                "<a>{{ m.content }}</a>{% endgeneration %}{% else %}<u>{{ m.content }}</u>"
                "{% endif %}{% endfor %}")
    ours, theirs = _both(byte_level, tmp_path, template)
    messages = [*USER, {"role": "assistant", "content": "hi"}]
    got, want = _render(ours, theirs, messages)
    assert got == want == "<u>héllo</u><a>hi</a>"


@pytest.mark.parametrize("template, words", [
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
    ("{% for i in range(10 ** 9) %}{% endfor %}", "OverflowError: Range too big"),
    ("{{ messages[0].content.encode('nope') }}", "LookupError: unknown encoding"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{{ raise_exception('only user and assistant roles') }}",
     "chat template: only user and assistant roles"),
    ("{% for m in messages %}{{ m.content }", "TemplateSyntaxError"),
], ids=["zero", "range", "lookup", "recursion", "raise_exception", "syntax"])
def test_template_errors_are_request_errors(template, words, byte_level, tmp_path):
    """ZeroDivisionError, OverflowError, LookupError, RecursionError came out of
    apply_chat_template as they were (a 500 and a traceback from the server)."""
    ours, _ = _both(byte_level, tmp_path, template)
    with pytest.raises(RequestError, match=words) as e:
        ours.apply_chat_template(USER)
    assert "\n" not in str(e.value)


def test_an_empty_conversation_is_refused(byte_level, tmp_path):
    """kiln rendered [] as the generation prompt alone; transformers refuses it."""
    ours, theirs = _both(byte_level, tmp_path, TOOLS_TEMPLATE)
    with pytest.raises(ValueError, match="empty conversation"):
        theirs.apply_chat_template([], tokenize=False)
    with pytest.raises(RequestError, match="at least one message"):
        ours.apply_chat_template([])


# ---- streaming over SentencePiece byte-fallback tokens ----------------------------------------

@pytest.fixture(scope="module")
def byte_fallback(tmp_path_factory) -> Tokenizer:
    """A Llama-style tokenizer.json (transformers' conversion of a tiny BPE tokenizer.model
    with byte fallback: CJK and emoji are byte tokens, decoded by ByteFallback)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("sp")
    (folder / "tokenizer.model").write_bytes(_train_sentencepiece("bpe", 330))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>"}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder / "hf")
    return Tokenizer(folder / "hf")


def _output_text(tok: Tokenizer, prompt: list[int], output: list[int], skip: bool) -> str:
    """The text past the prompt's whole characters: a character the prompt ends inside is
    the output's (byte fallback spells all of an unfinished run as U+FFFDs: the prompt's
    text is also taken at the last token that ends a character)."""
    full = tok.decode(prompt + output, skip)
    whole = next(text for end in range(len(prompt), -1, -1)
                 if not (text := tok.decode(prompt[:end], skip)).endswith("\ufffd"))
    assert full.startswith(whole)
    spelled = os.path.commonprefix([tok.decode(prompt, skip), full])  # byte-level BPE's
    return full[max(len(whole), len(spelled)):]  # U+FFFDs: one a byte, the rest kept


@pytest.mark.parametrize("text", ["日本 語のテキスト", "The 🎉🎉 fox 日本"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_byte_fallback_prompt_cutting_a_character(byte_fallback, text, skip_special_tokens):
    """A prompt of token ids ending inside a character ([<s>, ▁, <0xE6>] then <0x97>
    <0xA5> 日 <0xE6> <0x9C> <0xAC> 本): the next character streamed as "���" (the window
    began at <0x97>, a run ByteFallback spells as U+FFFDs); a 5-token tail starting inside
    a character lost the output's first characters (never streamed) or gave U+FFFDs."""
    tok = byte_fallback
    ids = tok.encode(text)
    assert ids[0] == 1 and tok.tok.id_to_token(ids[3]).startswith("<0x")
    for split in range(1, len(ids)):
        prompt, output = ids[:split], ids[split:]
        want = _output_text(tok, prompt, output, skip_special_tokens)
        for stream in (True, False):
            detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens)
            if not stream:
                detok._stream = None
            deltas = [detok.add(t) for t in output]
            assert "".join(deltas) == want, (split, stream, deltas)
            assert not any("\ufffd" in d for d in deltas), (split, stream, deltas)


def test_output_text_is_the_streamed_text_of_byte_level_bpe(byte_level):
    """The rule above is test_detokenize's streamed_text where U+FFFDs stand for bytes
    one by one (byte-level BPE): SmolLM2's tokenizer, a prompt ending inside 🤖."""
    tok = Tokenizer(byte_level)
    ids = tok.encode("日本 🤖🤖 ok", add_special_tokens=False)
    for split in range(1, len(ids)):
        prompt, output = ids[:split], ids[split:]
        want = _output_text(tok, prompt, output, True)
        assert want == streamed_text(tok, prompt, output), split
        detok = IncrementalDetokenizer(tok, prompt)
        assert "".join(detok.add(t) for t in output) == want, split


def test_named_tool_use_template_is_taken_with_tools(byte_level, tmp_path):
    """tokenizer_config.json's named templates (Hermes 2 Pro, Command R: "default",
    "tool_use", "rag"): kiln rendered a request with tools through "default", which
    never writes them; transformers takes "tool_use" where tools are given."""
    from transformers import AutoTokenizer

    named = [{"name": "default", "template": "{{ messages[0].content }}"},
             {"name": "tool_use", "template": "{{ tools|tojson }}{{ messages[0].content }}"},
             {"name": "rag", "template": "{{ documents|tojson }}"}]
    ours, _ = _both(byte_level, tmp_path, named)
    theirs = AutoTokenizer.from_pretrained(tmp_path / "tok")
    tools = [{"type": "function", "function": {"name": "f"}}]
    for extra in ({}, {"tools": tools}, {"tools": None}):
        got, want = _render(ours, theirs, USER, **extra)
        assert got == want, extra
    assert ours.apply_chat_template(USER, tools=tools).startswith('[{"type": "function"')
