"""/v1/chat/completions: messages through the model's chat template, a reply out."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fastapi import Request

from kiln.runtime.request import CompletionOutput, RequestOutput
from kiln.serve.context import ServeContext
from kiln.serve.errors import APIError
from kiln.serve.openai_call import (
    MAX_LOGPROBS,
    Call,
    collect,
    disconnected_response,
    stream_response,
)
from kiln.serve.openai_output import ChoiceState, chat_logprobs, usage
from kiln.serve.openai_tools import (
    auto_tools,
    forced_tools,
    parse_tool_calls,
    tool_calls,
    unsent_content,
    visible_text,
)
from kiln.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Delta,
    TextPart,
)
from kiln.serve.streaming import Event, TextChunks
from kiln.tokenizer import Tokenizer


def check_chat_request(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got "
                       f"{body.top_logprobs}", param="top_logprobs")
    if body.max_completion_tokens is not None and body.max_completion_tokens < 1:
        raise APIError(400, "max_completion_tokens must be at least 1, got "
                       f"{body.max_completion_tokens}", param="max_completion_tokens")


def message_chars(body: ChatCompletionRequest) -> int:
    """How much text the chat template and the tokenizer will work on."""
    total = 0
    for m in body.messages:
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content:
            total += sum(len(part.text or "") for part in m.content)
    return total


def _text(content: str | list[TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if any(part.type != "text" or part.text is None for part in content):
        raise APIError(400, "only text content parts are supported", param="messages")
    return "\n".join(part.text or "" for part in content)


def _template_message(m: ChatMessage) -> dict[str, Any]:
    """One message as chat templates read it: developer as system; an assistant turn's
    tool calls with their arguments as objects (OpenAI sends JSON text), a tool turn's
    tool_call_id and name."""
    message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": _text(m.content)}
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise APIError(400, "an assistant message's tool_calls must be {'type': "
                               "'function', 'function': {'name': ..., 'arguments': ...}}",
                               param="messages")
            arguments = function.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except (ValueError, RecursionError):
                    pass  # the template gets the text as it came
            calls.append({**call, "type": "function",
                          "function": {"name": function["name"], "arguments": arguments}})
        message["tool_calls"] = calls
    if m.role == "tool":
        message.update({k: v for k, v in (("tool_call_id", m.tool_call_id), ("name", m.name))
                        if v is not None})
    return message


def chat_prompt(tokenizer: Tokenizer | None, body: ChatCompletionRequest) -> list[int]:
    """Token ids of the templated conversation."""
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so it cannot apply a chat template")
    messages = [_template_message(m) for m in body.messages]
    tools = body.tools if body.tools and body.tool_choice != "none" else None
    text = tokenizer.apply_chat_template(messages, body.add_generation_prompt, tools=tools)
    # The template already wrote any BOS it wants: don't let the tokenizer add another.
    return tokenizer.encode(text, add_special_tokens=False)


async def respond_chat(ctx: ServeContext, call: Call, body: ChatCompletionRequest,
                       request: Request) -> Any:
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    calls_tool = forced_tools(body) is not None  # validated when the call started
    free_tools = auto_tools(body)  # tool_choice "auto": calls read from the free answer

    # By (choice, answer text): choices with the same text get calls with ids of their own.
    parsed: dict[tuple[int, str], tuple[str | None, list[dict[str, Any]]]] = {}

    def _parsed(completion: CompletionOutput) -> tuple[str | None, list[dict[str, Any]]]:
        """A finished free answer's (content, tool calls), parsed once per answer (the
        message and the finish reason both ask)."""
        if free_tools is None or completion.finish_reason != "stop":
            return completion.text, []
        key = (completion.index, completion.text)  # one prompt: index is the choice's
        if key not in parsed:
            content, calls = parse_tool_calls(completion.text, free_tools)
            if body.parallel_tool_calls is False:  # one call at most: the first
                calls = calls[:1]
            parsed[key] = content, calls
        return parsed[key]

    def _forced(completion: CompletionOutput) -> list[dict[str, Any]] | None:
        """A forced call's tool_calls once its JSON is whole: at the grammar's end, or at
        the token limit when the limit fell on the call's last token. None for a call cut
        short (by max_tokens, a stop string or a stop_token_ids token): its text is the
        answer, with that finish_reason."""
        if not calls_tool or completion.finish_reason not in ("stop", "length"):
            return None
        return tool_calls(completion.text)

    def _message(completion: CompletionOutput) -> AssistantMessage:
        forced = _forced(completion)
        if forced is not None:
            return AssistantMessage(tool_calls=forced)
        content, calls = _parsed(completion)
        if calls:
            return AssistantMessage(content=content, tool_calls=calls)
        return AssistantMessage(content=completion.text)

    def _finish(completion: CompletionOutput) -> str | None:
        if _forced(completion) is not None:
            return "tool_calls"
        if free_tools is not None and _parsed(completion)[1]:
            return "tool_calls"
        return completion.finish_reason

    def logprobs(completion: CompletionOutput, positions: range) -> Any:
        if top_n is None or not positions:
            return None
        return chat_logprobs(ctx.tokens, completion, positions, top_n)

    if body.stream:
        def chunk(choices: list[ChatChunkChoice], counts: tuple[int, ...] | None = None
                  ) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=call.id, created=call.created, model=call.model,
                                       choices=choices, usage=usage(*counts) if counts else None)

        plain = TextChunks(lambda index, text: chunk([ChatChunkChoice(
            index=index, delta=Delta(content=text))]))  # content only: most tokens

        def last(completion: CompletionOutput, state: ChoiceState, delta: Delta
                 ) -> list[ChatCompletionChunk | Event]:
            """A choice's last chunk, with a whole call (and the logprobs not sent yet)."""
            state.finished_sent = True
            rest = range(state.sent_tokens, len(completion.token_ids))
            return [chunk([ChatChunkChoice(index=state.index, delta=delta,
                                           logprobs=logprobs(completion, rest),
                                           finish_reason=_finish(completion),
                                           stop_reason=completion.stop_reason)])]

        def chunks(output: RequestOutput, completion: CompletionOutput, state: ChoiceState
                   ) -> list[ChatCompletionChunk | Event]:
            if state.finished_sent:  # n > 1: later outputs repeat a finished choice
                return []
            if calls_tool:  # the call goes out whole, once its JSON is complete
                if completion.finish_reason is None:
                    return []
                message = _message(completion)
                return last(completion, state, Delta(
                    content=message.content, tool_calls=None if message.tool_calls is None
                    else [{"index": 0, **message.tool_calls[0]}]))
            if free_tools is not None:
                if completion.finish_reason is None:  # hold what may become a call
                    completion = dataclasses.replace(completion,
                                                     text=visible_text(completion.text))
                else:
                    content, calls = _parsed(completion)
                    if calls:  # the rest of the content and the calls, in the last chunk
                        return last(completion, state, Delta(
                            content=None if content is None else
                            unsent_content(completion.text, state.text.sent),
                            tool_calls=[{"index": i, **c} for i, c in enumerate(calls)]))
            new = state.stream_delta(completion, top_n is not None)
            if new is None:
                return []
            text, positions = new
            if text and top_n is None and completion.finish_reason is None:
                return [plain.sse(state.index, text)]
            return [chunk([ChatChunkChoice(index=state.index, delta=Delta(content=text or None),
                                           logprobs=logprobs(completion, positions),
                                           finish_reason=completion.finish_reason,
                                           stop_reason=completion.stop_reason)])]

        # OpenAI opens each choice with a chunk that carries only the role.
        prelude = [chunk([ChatChunkChoice(index=s.index, delta=Delta(role="assistant",
                                                                     content=""))])
                   for s in call.states]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usage_chunk = (lambda *counts: chunk([], counts)) if include_usage else None
        return stream_response(call, chunks, prelude, usage_chunk)

    finals = await collect(call, request)
    if finals is None:
        return disconnected_response()
    choices = [ChatChoice(index=state.index, message=_message(completion),
                          logprobs=logprobs(completion, range(len(completion.token_ids))),
                          finish_reason=_finish(completion), stop_reason=completion.stop_reason)
               for output in finals for completion, state in call.choices(output)]
    choices.sort(key=lambda c: c.index)
    return ChatCompletionResponse(id=call.id, created=call.created, model=call.model,
                                  choices=choices, usage=usage(*call.usage_counts(finals)))
