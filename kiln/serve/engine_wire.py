"""What crosses the pipe between the engine process and the server: outputs as deltas.

An engine output is cumulative (the whole text and token list so far). Sending it whole
each step would cost O(length) per token on both sides of the pipe, so the engine
process sends what is new since its last output of that request (`OutputEncoder`), and
the server rebuilds the cumulative output (`OutputAssembler`). A text can also shrink:
a stop string found at the end is cut from it, so a delta says how much of the old text
to keep, then what to append. Token ids and logprobs only grow; they use the same form.

Errors travel as (kind, message) and are raised again as the same kiln error class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.errors import KilnError, PromptTooLongError, RequestError
from kiln.runtime.request import CompletionOutput, RequestOutput

# A delta of one completion: (index, text kept, text appended, tokens kept, tokens appended,
# finish_reason, stop_reason, cumulative_logprob, logprobs kept, logprobs appended or None)
CompletionDelta = tuple[int, int, str, int, list[int], str | None, Any, float | None, int,
                        list[dict[int, float]] | None]


@dataclass
class _Sent:
    """What the server has of one request: per completion index, lengths of text,
    token ids and logprobs; whether its prompt logprobs are complete."""

    lengths: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    prompt_logprobs_done: bool = False


class OutputEncoder:
    """Engine side, one per group of requests: RequestOutput -> a picklable delta."""

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}

    def encode(self, output: RequestOutput) -> tuple:
        sent = self._sent.get(output.request_id)
        first = sent is None
        if sent is None:
            sent = self._sent[output.request_id] = _Sent()
        completions: list[CompletionDelta] = []
        any_tokens = False
        for c in output.outputs:
            text_len, tok_len, lp_len = sent.lengths.get(c.index, (0, 0, 0))
            text, tokens, logprobs = c.text, c.token_ids, c.logprobs
            keep_text, keep_tok = min(text_len, len(text)), min(tok_len, len(tokens))
            keep_lp = min(lp_len, len(logprobs)) if logprobs is not None else 0
            completions.append((
                c.index, keep_text, text[keep_text:], keep_tok, tokens[keep_tok:],
                c.finish_reason, c.stop_reason, c.cumulative_logprob, keep_lp,
                logprobs[keep_lp:] if logprobs is not None else None))
            sent.lengths[c.index] = (len(text), len(tokens),
                                     len(logprobs) if logprobs is not None else 0)
            any_tokens = any_tokens or bool(tokens)
        prompt_logprobs = None
        if output.prompt_logprobs is not None and not sent.prompt_logprobs_done:
            # Filled while the prompt is computed; complete once a token was sampled.
            prompt_logprobs = list(output.prompt_logprobs)
            sent.prompt_logprobs_done = any_tokens
        if output.finished:
            del self._sent[output.request_id]
        return (output.request_id, output.finished,
                (output.prompt, output.prompt_token_ids) if first else None,
                completions, prompt_logprobs, output.metrics if output.finished else None)


class _Completion:
    __slots__ = ("text", "tokens", "logprobs")

    def __init__(self) -> None:
        self.text = ""
        self.tokens: list[int] = []
        self.logprobs: list[dict[int, float]] | None = None


class OutputAssembler:
    """Server side, one per engine request: deltas -> cumulative RequestOutputs."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.prompt: str | None = None
        self.prompt_token_ids: list[int] = []
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self._completions: dict[int, _Completion] = {}

    def apply(self, delta: tuple) -> RequestOutput:
        _, finished, prompt, completions, prompt_logprobs, metrics = delta
        if prompt is not None:
            self.prompt, self.prompt_token_ids = prompt
        if prompt_logprobs is not None:
            self.prompt_logprobs = prompt_logprobs
        outputs = []
        for (index, keep_text, text, keep_tok, tokens, finish_reason, stop_reason,
             cumulative_logprob, keep_lp, logprobs) in completions:
            c = self._completions.get(index)
            if c is None:
                c = self._completions[index] = _Completion()
            c.text = c.text + text if keep_text == len(c.text) else c.text[:keep_text] + text
            if keep_tok < len(c.tokens):
                del c.tokens[keep_tok:]
            c.tokens += tokens
            if logprobs is not None:
                if c.logprobs is None:
                    c.logprobs = []
                del c.logprobs[keep_lp:]
                c.logprobs += logprobs
            outputs.append(CompletionOutput(
                index, c.text, list(c.tokens), finish_reason, stop_reason, cumulative_logprob,
                list(c.logprobs) if c.logprobs is not None else None))
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs,
                             finished, metrics, self.prompt_logprobs)


def portable_error(error: BaseException) -> tuple[str, str]:
    """(class name, message) of an error the server raises again (`rebuild_error`)."""
    return type(error).__name__, str(error)


def rebuild_error(kind: str, message: str) -> KilnError:
    from kiln.serve.engine_loop import EngineDeadError, EngineStepError

    classes: dict[str, type[KilnError]] = {
        c.__name__: c for c in (KilnError, RequestError, PromptTooLongError, EngineStepError,
                                EngineDeadError)}
    return classes.get(kind, KilnError)(message)

