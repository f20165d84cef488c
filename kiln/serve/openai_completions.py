"""/v1/completions: prompts in, text (or text chunks) out.

`echo` puts the prompt before each choice's text (and, with `logprobs`, the prompt
tokens' logprobs before the generated ones, the first being null, as OpenAI does).
`best_of` asks the engine for best_of candidates per prompt and returns the n with the
highest logprob per token, as OpenAI ranks them (a cumulative logprob would put the
shortest candidates first, an empty one before all). `max_tokens: 0` (not streamed)
generates nothing: with `echo` and `logprobs` it scores the prompt, as evaluation
harnesses ask OpenAI's legacy API to (the engine computes one token, which the answer
leaves out). `prompt_logprobs` (vLLM's extension) adds each prompt token's logprob and
the top-n alternatives, keyed by token id.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import Request

from kiln.runtime.request import CompletionOutput, RequestOutput
from kiln.serve.context import ServeContext
from kiln.serve.engine_loop import Prompt
from kiln.serve.errors import APIError
from kiln.serve.openai_call import Call, collect, disconnected_response, stream_response
from kiln.serve.openai_output import (
    ChoiceState,
    TextOffsets,
    completion_logprobs,
    echo_logprobs,
    prompt_logprobs,
    prompt_offsets,
    usage,
)
from kiln.serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from kiln.serve.streaming import Event, TextChunks


def completion_prompts(body: CompletionRequest) -> list[Prompt]:
    """The request's prompts (text or token ids); rejects what kiln does not support."""
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of < body.n:
        raise APIError(400, f"best_of must be at least n ({body.n}), got {body.best_of}",
                       param="best_of")
    if body.best_of is not None and body.best_of > body.n and body.stream:
        raise APIError(400, "best_of cannot be used with stream", param="best_of")
    if body.max_tokens == 0 and body.stream:
        raise APIError(400, "max_tokens 0 (the prompt alone, e.g. to score it with echo and "
                       "logprobs) cannot be streamed", param="max_tokens")
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]  # type: ignore[arg-type]
    return [p if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[misc]


def engine_choices(body: CompletionRequest) -> tuple[int, int | None, int | None]:
    """(candidates per prompt, engine logprobs, engine prompt logprobs) for this request;
    completion_prompts has checked best_of."""
    best_of = max(body.n, body.best_of or 0)
    logprobs = body.logprobs
    if best_of > body.n and logprobs is None:
        logprobs = 0  # the ranking needs each candidate's cumulative logprob
    wanted = [v for v in (body.prompt_logprobs,
                          body.logprobs if body.echo else None) if v is not None]
    return best_of, logprobs, max(wanted) if wanted else None


def engine_max_tokens(body: CompletionRequest) -> int | None:
    """max_tokens 0 computes one token, left out of the answer (_prompt_only)."""
    return 1 if body.max_tokens == 0 else body.max_tokens


def _prompt_only(output: RequestOutput) -> RequestOutput:
    return dataclasses.replace(output, outputs=[dataclasses.replace(
        c, text="", token_ids=[], finish_reason="length", stop_reason=None,
        cumulative_logprob=None if c.cumulative_logprob is None else 0.0,
        logprobs=None if c.logprobs is None else []) for c in output.outputs])


def _best(completions: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    if len(completions) <= n:
        return sorted(completions, key=lambda c: c.index)
    return sorted(completions, key=lambda c: -(c.cumulative_logprob or 0.0)
                  / max(len(c.token_ids), 1))[:n]


async def respond_completion(ctx: ServeContext, call: Call, body: CompletionRequest,
                             request: Request) -> Any:
    top_n = body.logprobs
    tokenizer = ctx.tokens.tokenizer

    def prompt_text(output: RequestOutput) -> str:
        """The echo: a text prompt as sent; token ids decoded with their special tokens
        (as vLLM echoes them), so that the text holds every token logprobs list."""
        if output.prompt is not None:
            return output.prompt
        return tokenizer.decode(output.prompt_token_ids, skip_special_tokens=False) \
            if tokenizer is not None else ""

    def starts(output: RequestOutput, completion: CompletionOutput, state: ChoiceState,
               count: int) -> list[int]:
        """Where the choice's first `count` generated tokens start in its generated text."""
        if state.offsets is None:
            state.offsets = TextOffsets(tokenizer, output.prompt_token_ids,
                                        body.skip_special_tokens)
        return state.offsets.upto(completion.token_ids, count)

    def choice(output: RequestOutput, completion: CompletionOutput, state: ChoiceState,
               text: str, positions: range, first: bool, end: int) -> CompletionChoice:
        """`first`: the choice's first piece, which carries the echo and prompt logprobs;
        `end`: how much of the generated text has been given out with this piece (no
        token's text_offset is past it)."""
        logprobs = None
        if first and body.echo:
            echoed = prompt_text(output)
            text, state.text_offset = echoed + text, len(echoed)
            if top_n is not None:
                logprobs = echo_logprobs(ctx.tokens, output, top_n,
                                         prompt_offsets(tokenizer, output, echoed))
        if top_n is not None and positions:
            begin = starts(output, completion, state, positions.stop)
            offsets = [state.text_offset + min(begin[i], end) for i in positions]
            generated = completion_logprobs(ctx.tokens, completion, positions, top_n, offsets)
            if logprobs is None:
                logprobs = generated
            else:
                for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(logprobs, name).extend(getattr(generated, name))
        prompt_lps = (prompt_logprobs(ctx.tokens, output, body.prompt_logprobs)
                      if first and body.prompt_logprobs is not None else None)
        return CompletionChoice(index=state.index, text=text, logprobs=logprobs,
                                finish_reason=completion.finish_reason,
                                stop_reason=completion.stop_reason, prompt_logprobs=prompt_lps)

    def response(choices: list[CompletionChoice], counts: tuple[int, ...] | None = None
                 ) -> CompletionResponse:
        return CompletionResponse(id=call.id, created=call.created, model=call.model,
                                  choices=choices, usage=usage(*counts) if counts else None)

    if body.stream:
        plain = TextChunks(lambda index, text: response([CompletionChoice(
            index=index, text=text)]))  # text only: every piece after the first

        def chunks(output: RequestOutput, completion: CompletionOutput, state: ChoiceState
                   ) -> list[CompletionResponse | Event]:
            new = state.stream_delta(completion, top_n is not None)
            if new is None:
                return []
            text, positions = new
            if top_n is not None and completion.finish_reason is None:
                # A token whose text is held back (it may become a stop string, which
                # would be cut) waits with it, so that no text_offset points past the text.
                begin = starts(output, completion, state, positions.stop)
                ready = next((i for i in positions if begin[i] > state.text.sent),
                             positions.stop)
                positions, state.sent_tokens = range(positions.start, ready), ready
                if not text and not positions:
                    return []
            if state.opened and text and top_n is None and completion.finish_reason is None:
                return [plain.sse(state.index, text)]
            first, state.opened = not state.opened, True
            return [response([choice(output, completion, state, text, positions, first,
                                     state.text.sent)])]

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usage_chunk = (lambda *counts: response([], counts)) if include_usage else None
        return stream_response(call, chunks, [], usage_chunk)

    finals = await collect(call, request, _prompt_only if body.max_tokens == 0 else None)
    if finals is None:
        return disconnected_response()
    choices = []
    for output in finals:
        base = call.prompt_of[output.request_id] * body.n
        for i, completion in enumerate(_best(output.outputs, body.n)):
            choices.append(choice(output, completion, ChoiceState(base + i), completion.text,
                                  range(len(completion.token_ids)), True,
                                  len(completion.text)))
    choices.sort(key=lambda c: c.index)
    return response(choices, call.usage_counts(finals))
