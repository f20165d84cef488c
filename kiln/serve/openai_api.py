"""OpenAI API routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from kiln.serve.context import ServeContext, get_context
from kiln.serve.engine_loop import Prompt
from kiln.serve.openai_call import start_call
from kiln.serve.openai_chat import (
    chat_prompt,
    check_chat_request,
    message_chars,
    respond_chat,
)
from kiln.serve.openai_completions import (
    completion_prompts,
    engine_choices,
    engine_max_tokens,
    respond_completion,
)
from kiln.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models")
async def list_models(ctx: ServeContext = Depends(get_context)) -> ModelList:
    return ModelList(data=[_model_card(ctx)])


@router.get("/v1/models/{model:path}")
async def get_model(model: str, ctx: ServeContext = Depends(get_context)) -> ModelCard:
    ctx.check_model(model, status=404)
    return _model_card(ctx)


def _model_card(ctx: ServeContext) -> ModelCard:
    tokenizer = ctx.llm.tokenizer
    return ModelCard(id=ctx.model_name, created=ctx.created, max_model_len=ctx.llm.max_seq_len,
                     chat_template=bool(tokenizer is not None and tokenizer.chat_template))


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request,
                            ctx: ServeContext = Depends(get_context)) -> Any:
    best_of, logprobs, prompt_logprobs = engine_choices(body)
    call = await start_call(ctx, "/v1/completions", "cmpl", body,
                            lambda: completion_prompts(body), engine_max_tokens(body), logprobs,
                            best_of, prompt_logprobs, request=request)
    return await respond_completion(ctx, call, body, request)


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 ctx: ServeContext = Depends(get_context)) -> Any:
    def prompts() -> list[Prompt]:
        check_chat_request(body)
        return [chat_prompt(ctx.llm.tokenizer, body)]

    top_n = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = (body.max_completion_tokens if body.max_completion_tokens is not None
                  else body.max_tokens)
    call = await start_call(ctx, "/v1/chat/completions", "chatcmpl", body, prompts,
                            max_tokens, top_n, prompt_chars=message_chars(body),
                            request=request)
    return await respond_chat(ctx, call, body, request)
