"""/v1/completions: prompts in, text (or text chunks) out."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from kiln.runtime.request import CompletionOutput, RequestOutput
from kiln.serve.context import ServeContext
from kiln.serve.engine_loop import Prompt
from kiln.serve.errors import APIError
from kiln.serve.openai_call import Call, collect, disconnected_response, stream_response
from kiln.serve.openai_output import ChoiceState, completion_logprobs, usage
from kiln.serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse


def completion_prompts(body: CompletionRequest) -> list[Prompt]:
    """The request's prompts (text or token ids); rejects what kiln does not support."""
    if body.echo:
        raise APIError(400, "echo is not supported", param="echo")
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]  # type: ignore[arg-type]
    return [p if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[misc]


async def respond_completion(ctx: ServeContext, call: Call, body: CompletionRequest,
                             request: Request) -> Any:
    top_n = body.logprobs

    def choice(completion: CompletionOutput, state: ChoiceState, text: str,
               positions: range) -> CompletionChoice:
        logprobs = (completion_logprobs(ctx.tokens, completion, positions, top_n, state)
                    if top_n is not None and positions else None)
        return CompletionChoice(index=state.index, text=text, logprobs=logprobs,
                                finish_reason=completion.finish_reason)

    def response(choices: list[CompletionChoice], counts: tuple[int, int] | None = None
                 ) -> CompletionResponse:
        return CompletionResponse(id=call.id, created=call.created, model=call.model,
                                  choices=choices, usage=usage(*counts) if counts else None)

    if body.stream:
        def chunks(output: RequestOutput, completion: CompletionOutput, state: ChoiceState
                   ) -> list[CompletionResponse]:
            new = state.stream_delta(completion, top_n is not None)
            if new is None:
                return []
            text, positions = new
            return [response([choice(completion, state, text, positions)])]

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usage_chunk = (lambda p, c: response([], (p, c))) if include_usage else None
        return stream_response(call, chunks, [], usage_chunk)

    finals = await collect(call, request)
    if finals is None:
        return disconnected_response()
    choices = [choice(completion, state, completion.text, range(len(completion.token_ids)))
               for output in finals for completion, state in call.choices(output)]
    choices.sort(key=lambda c: c.index)
    return response(choices, call.usage_counts(finals))
