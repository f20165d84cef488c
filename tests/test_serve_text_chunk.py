"""TextChunk: the per-token chunk of a stream, filled into JSON serialized once, must be
the chunk pydantic would write (as JSON), whatever the text holds."""

from __future__ import annotations

import json

import pytest

from kiln.serve.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    Delta,
)
from kiln.serve.streaming import Event, TextChunk, TextChunks, sse

TEXTS = ["hello", " world", "", 'quote " and \\ backslash', "line\nbreak\ttab\r",
         "\x00\x01\x1f control", "caf\u00e9 \u4e2d\u6587 \U0001f600", "</script>", "\u2028\u2029",
         TextChunk.MARK]


def _chat(index: int, text: str) -> ChatCompletionChunk:
    return ChatCompletionChunk(id="chatcmpl-1", created=1700000000, model="m \"x\"",
                               choices=[ChatChunkChoice(index=index, delta=Delta(content=text))])


def _completion(index: int, text: str) -> CompletionResponse:
    return CompletionResponse(id="cmpl-1", created=1700000000, model="m",
                              choices=[CompletionChoice(index=index, text=text)])


@pytest.mark.parametrize("make", [_chat, _completion])
@pytest.mark.parametrize("index", [0, 3])
def test_text_chunk_is_the_pydantic_chunk(make, index):
    template = TextChunk(make(index, TextChunk.MARK))
    for text in TEXTS:
        event = template.sse(text)
        assert isinstance(event, Event) and sse(event) is event  # passes through sse()
        assert event.startswith("data: ") and event.endswith("\n\n")
        want = json.loads(sse(make(index, text))[len("data: "):])
        assert json.loads(event[len("data: "):-2]) == want


def test_a_chunk_without_the_marker_is_refused():
    with pytest.raises(ValueError):
        TextChunk(_chat(0, "no marker"))
    with pytest.raises(ValueError):  # twice: which one to fill?
        TextChunk(ChatCompletionChunk(id=TextChunk.MARK, created=1, model="m", choices=[
            ChatChunkChoice(index=0, delta=Delta(content=TextChunk.MARK))]))


def test_a_plain_string_is_still_wrapped():
    assert sse("[DONE]") == "data: [DONE]\n\n"


def test_text_chunks_make_one_template_per_choice():
    made = []

    def make(index, text):
        made.append(index)
        return _chat(index, text)

    chunks = TextChunks(make)
    for index in (0, 1, 0, 1, 0):
        event = chunks.sse(index, "tok")
        assert json.loads(event[len("data: "):-2]) == json.loads(sse(_chat(index, "tok"))[6:])
    assert made == [0, 1]
