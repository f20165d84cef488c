"""Pydantic schemas of the OpenAI HTTP API (the subset kiln serves), requests and replies.

Field names and defaults follow the OpenAI API reference. Unknown request fields are
ignored, as other OpenAI-compatible servers do, so clients written for them work here.
A few vLLM-style extensions (top_k, min_p, ignore_eos, ...) sit beside the standard ones;
vLLM's constrained-decoding fields are known, so that those kiln cannot honour are
refused rather than ignored.
Value ranges are checked by `SamplingParams`, not here, so there is one set of rules.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _NullIsDefault(BaseModel):
    """OpenAI's request fields are nullable, and clients send an option left unset as null
    (the openai client sends `n=None` as `"n": null`): a null given to a field that holds
    no None of its own means that field's default, as in OpenAI's API and vLLM."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {key: value for key, value in data.items()
                if value is not None or key not in fields or fields[key].is_required()
                or _takes_none(fields[key].annotation)}


def _takes_none(annotation: Any) -> bool:
    """Whether a field's type admits None (`int | None`): its null is a value of its own."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(annotation)


class StreamOptions(_NullIsDefault):
    include_usage: bool = False


class _GenerationRequest(_NullIsDefault):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the served model
    n: int = 1
    temperature: float | None = None  # None: 1.0, as OpenAI
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (vLLM names).
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # kiln extension: drafts per verify step on a speculative engine (0: none)
    num_speculative_tokens: int | None = None
    # vLLM's constrained decoding (kiln.serve.openai_call.structured): guided_json and
    # structured_outputs' json / json_object are served like response_format; the others
    # are refused with a 400 that says what to use instead, never ignored.
    guided_json: Any = None
    guided_choice: Any = None
    guided_regex: Any = None
    guided_grammar: Any = None
    guided_whitespace_pattern: Any = None
    guided_decoding_backend: Any = None
    structured_outputs: Any = None


class CompletionRequest(_GenerationRequest):
    # Text, token ids, or a batch of either.
    prompt: str | list[str] | list[int] | list[list[int]]
    response_format: dict[str, Any] | None = None  # an extension, as vLLM has it
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    prompt_logprobs: int | None = None  # extension (vLLM): top-n logprobs of prompt tokens


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call (the first)
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True  # extension: the chat template's flag


# ---- replies ------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's Logprob: one entry of `prompt_logprobs`, keyed by token id."""

    logprob: float
    rank: int | None = None  # 1 = the most likely token; None: not among the top-n
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # Extension (vLLM): the stop string or stop_token_ids token that ended the choice;
    # with finish_reason "abort" from the engine, why (a constraint that allows no token).
    stop_reason: int | str | None = None
    # Extension (vLLM): per prompt token (the first has none), token id -> logprob.
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (with `stream`) one chunk of it: the schema is shared."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # as CompletionChoice's


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # as CompletionChoice's


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kiln"
    max_model_len: int | None = None
    # kiln's own field: whether /v1/chat/completions can template messages for this model
    # (without a template only /v1/completions takes prompts; the playground reads it).
    chat_template: bool | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
