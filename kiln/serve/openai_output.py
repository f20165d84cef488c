"""Engine outputs -> OpenAI choices: text deltas for streaming, logprobs in both formats."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.runtime.request import CompletionOutput, RequestOutput
from kiln.runtime.text_deltas import TextDeltas
from kiln.serve.protocol import (
    ChatLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from kiln.serve.tokens import TokenTexts


@dataclass
class ChoiceState:
    """How much of one choice a stream has sent so far."""

    index: int
    text: TextDeltas = field(default_factory=TextDeltas)
    sent_tokens: int = 0
    text_offset: int = 0  # of the next token, for completions logprobs
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
                        top_n: int, state: ChoiceState) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for token_id, logprob, top in _entries(completion, positions, top_n):
        text = tokens.text(token_id)
        out.tokens.append(text)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append(_with_token(tokens, top, token_id, logprob))
        out.text_offset.append(state.text_offset)
        state.text_offset += len(text)
    return out


def echo_logprobs(tokens: TokenTexts, output: RequestOutput, top_n: int,
                  state: ChoiceState) -> CompletionLogprobs:
    """The prompt tokens in completions logprobs (`echo`): the first has no logprob."""
    out = CompletionLogprobs()
    entries = output.prompt_logprobs or []
    for i, token_id in enumerate(output.prompt_token_ids):
        entry = entries[i] if i < len(entries) else None
        text = tokens.text(token_id)
        out.tokens.append(text)
        out.token_logprobs.append(entry.get(token_id) if entry else None)
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n] if entry else None
        out.top_logprobs.append(_with_token(tokens, top, token_id, entry.get(token_id))
                                if top is not None else None)
        out.text_offset.append(state.text_offset)
        state.text_offset += len(text)
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


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)
