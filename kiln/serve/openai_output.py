"""Engine outputs -> OpenAI choices: text deltas for streaming, logprobs in both formats."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.runtime.request import CompletionOutput, RequestOutput
from kiln.runtime.text_deltas import TextDeltas
from kiln.serve.protocol import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from kiln.serve.tokens import TokenTexts
from kiln.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class ChoiceState:
    """How much of one choice a stream has sent so far."""

    index: int
    text: TextDeltas = field(default_factory=TextDeltas)
    sent_tokens: int = 0
    text_offset: int = 0  # where the generated text starts in the choice's (after an echo)
    offsets: TextOffsets | None = None  # completions logprobs: where its tokens start
    finished_sent: bool = False  # n > 1: a finished choice is repeated in later outputs
    opened: bool = False  # a stream has sent this choice's first chunk

    def advance(self, completion: CompletionOutput, finished: bool) -> tuple[str, range]:
        """The text and the token positions that are new since the last call."""
        delta = self.text.next(completion.text, finished)
        positions = range(self.sent_tokens, len(completion.token_ids))
        self.sent_tokens = len(completion.token_ids)
        return delta, positions

    def stream_delta(self, completion: CompletionOutput, with_logprobs: bool
                     ) -> tuple[str, range] | None:
        """What a stream sends for this choice now, or None when there is nothing new (a
        finished choice is announced once, though n > 1 outputs keep repeating it)."""
        if self.finished_sent:
            return None
        finished = self.finished_sent = completion.finish_reason is not None
        text, positions = self.advance(completion, finished)
        if not text and not finished and not (with_logprobs and positions):
            return None
        return text, positions


class TextOffsets:
    """Where each generated token starts in its choice's text (completions' text_offset):
    characters as the engine's detokenizer adds them (primed with the prompt's tail), so a
    token that holds part of a UTF-8 character adds none until a later one completes it."""

    def __init__(self, tokenizer: Tokenizer | None, context: list[int],
                 skip_special_tokens: bool) -> None:
        self.detok = None if tokenizer is None else IncrementalDetokenizer(
            tokenizer, context, skip_special_tokens)
        self.starts: list[int] = []
        self.chars = 0

    def upto(self, token_ids: list[int], count: int) -> list[int]:
        """The starts of the first `count` tokens (and any computed before)."""
        for i in range(len(self.starts), count):
            self.starts.append(self.chars)
            if self.detok is not None:
                self.chars += len(self.detok.add(token_ids[i]))
        return self.starts


def prompt_offsets(tokenizer: Tokenizer | None, output: RequestOutput, echoed: str
                   ) -> list[int]:
    """Where each prompt token starts in the echoed prompt: a text prompt's own offsets
    when the tokenizer makes these ids of it (a BOS it adds starts at 0), else as decoding
    with special tokens adds them (token-id prompts are echoed so); at most len(echoed)."""
    ids = list(output.prompt_token_ids)
    starts = None
    if tokenizer is not None and output.prompt is not None:
        encoding = tokenizer.tok.encode(output.prompt, add_special_tokens=True)
        if encoding.ids == ids:
            starts = [start for start, _ in encoding.offsets]
    if starts is None:
        starts = TextOffsets(tokenizer, [], False).upto(ids, len(ids))
    out, last = [], 0
    for start in starts:  # a token added at the end (an EOS) says 0: keep them in order
        last = min(max(last, start), len(echoed))
        out.append(last)
    return out


def _entries(completion: CompletionOutput, positions: range, top_n: int
             ) -> list[tuple[int, float | None, list[tuple[int, float]]]]:
    """(token id, its logprob, top_n alternatives) for each position."""
    # The engine may append to its logprob list while we read: index, never iterate past.
    logprobs = completion.logprobs or []
    rows = []
    for i in positions:
        token_id = completion.token_ids[i]
        entry = logprobs[i] if i < len(logprobs) else {}
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
        rows.append((token_id, entry.get(token_id), top))
    return rows


def _with_token(tokens: TokenTexts, top: list[tuple[int, float]], token_id: int,
                logprob: float | None) -> dict[str, float]:
    """Completions' top_logprobs: the top_n alternatives and, as OpenAI's legacy API
    always includes it, the token itself (up to top_n + 1 entries)."""
    out = {tokens.text(t): v for t, v in top}
    if logprob is not None and all(t != token_id for t, _ in top):
        out[tokens.text(token_id)] = logprob
    return out


def completion_logprobs(tokens: TokenTexts, completion: CompletionOutput, positions: range,
                        top_n: int, offsets: list[int]) -> CompletionLogprobs:
    """`offsets`: where each position's token starts in the choice's text."""
    out = CompletionLogprobs()
    for (token_id, logprob, top), offset in zip(_entries(completion, positions, top_n),
                                                offsets, strict=True):
        out.tokens.append(tokens.text(token_id))
        out.token_logprobs.append(logprob)
        out.top_logprobs.append(_with_token(tokens, top, token_id, logprob))
        out.text_offset.append(offset)
    return out


def echo_logprobs(tokens: TokenTexts, output: RequestOutput, top_n: int,
                  offsets: list[int]) -> CompletionLogprobs:
    """The prompt tokens in completions logprobs (`echo`): the first has no logprob;
    `offsets` from prompt_offsets."""
    out = CompletionLogprobs()
    entries = output.prompt_logprobs or []
    for i, token_id in enumerate(output.prompt_token_ids):
        entry = entries[i] if i < len(entries) else None
        out.tokens.append(tokens.text(token_id))
        out.token_logprobs.append(entry.get(token_id) if entry else None)
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n] if entry else None
        out.top_logprobs.append(_with_token(tokens, top, token_id, entry.get(token_id))
                                if top is not None else None)
        out.text_offset.append(offsets[i])
    return out


def prompt_logprobs(tokens: TokenTexts, output: RequestOutput, top_n: int
                    ) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, its logprob and the top_n others."""
    rows: list[dict[str, PromptLogprob] | None] = []
    entries = output.prompt_logprobs or []
    for i, token_id in enumerate(output.prompt_token_ids):
        entry = entries[i] if i < len(entries) else None
        if not entry:
            rows.append(None)
            continue
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])
        rank = {t: r for r, (t, _) in enumerate(ranked[:top_n], 1)}
        keep = [token_id, *(t for t, _ in ranked[:top_n] if t != token_id)]
        rows.append({str(t): PromptLogprob(logprob=entry[t], rank=rank.get(t),
                                           decoded_token=tokens.text(t))
                     for t in keep if t in entry})
    return rows


def chat_logprobs(tokens: TokenTexts, completion: CompletionOutput, positions: range,
                  top_n: int) -> ChatLogprobs:
    content = []
    for token_id, logprob, top in _entries(completion, positions, top_n):
        text, raw = tokens(token_id)
        alternatives = [TopLogprob(token=tokens(t)[0], logprob=v, bytes=tokens(t)[1])
                        for t, v in top]
        content.append(TokenLogprob(token=text, logprob=logprob if logprob is not None else
                                    float("-inf"), bytes=raw, top_logprobs=alternatives))
    return ChatLogprobs(content=content)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))
