"""One OpenAI API call in flight, shared by completions and chat.

A call is one engine request per prompt, submitted as a group so that all are accepted
or rejected together. The engine makes the n choices of a prompt itself (seeds seed + i,
the prompt's KV blocks shared); choice p * n + i is completion i of prompt p.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response

from kiln.errors import RequestError
from kiln.runtime.request import CompletionOutput, RequestOutput, SamplingParams
from kiln.runtime.text_deltas import TextDeltas
from kiln.serve.async_llm import RequestStream
from kiln.serve.context import ServeContext
from kiln.serve.engine_loop import Prompt
from kiln.serve.errors import APIError, api_error, check_unicode
from kiln.serve.metrics import RequestTracker
from kiln.serve.openai_output import ChoiceState
from kiln.serve.protocol import ChatCompletionRequest, CompletionRequest
from kiln.serve.streaming import (
    ClientDisconnected,
    EventStreamResponse,
    sse,
    submit_watched,
    until_disconnect,
)

MAX_CHOICES = 128  # prompts x n in one call
MAX_LOGPROBS = 20
# Chat templates and tokenization of requests larger than this (characters of message
# text) run on a worker thread, so that other streams are not held up meanwhile.
INLINE_PROMPT_CHARS = 32_768
_INT64 = 1 << 63

# Called per new output of one choice: the SSE chunks (pydantic models) to send.
ChunkMaker = Callable[[RequestOutput, CompletionOutput, ChoiceState], list[Any]]


@dataclass
class Call:
    """One API call in flight: its engine requests and how they map to choices."""

    id: str
    created: int
    model: str
    n: int
    stream: RequestStream
    tracker: RequestTracker
    prompt_of: dict[str, int]  # engine request id -> prompt index
    states: list[ChoiceState]  # by choice index

    def choices(self, output: RequestOutput) -> Iterator[tuple[CompletionOutput, ChoiceState]]:
        base = self.prompt_of[output.request_id] * self.n
        for completion in output.outputs:
            yield completion, self.states[base + completion.index]

    def close(self) -> None:
        """However the call ended: abort what is unfinished, record it (once)."""
        self.stream.abort()
        self.tracker.finish("aborted")

    def usage_counts(self, outputs: list[RequestOutput]) -> tuple[int, int]:
        return (sum(len(out.prompt_token_ids) for out in outputs),
                sum(len(c.token_ids) for out in outputs for c in out.outputs))


def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None,
                    logprobs: int | None, n: int | None = None,
                    prompt_logprobs: int | None = None, vocab_size: int | None = None
                    ) -> SamplingParams:
    """The engine's parameters; raises RequestError (400) on bad values. `n` overrides
    the body's (best_of candidates)."""
    n = body.n if n is None else n
    # Checked here because a bad value would fail the engine step of the whole batch.
    if body.seed is not None and not -_INT64 <= body.seed < _INT64 - max(n, 1):
        raise APIError(400, "seed must fit in 64 bits", param="seed")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}]", param="logprobs")
    if prompt_logprobs is not None and not 0 <= prompt_logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]",
                       param="prompt_logprobs")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        n=n, max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0, seed=body.seed, stop=stop,
        stop_token_ids=list(body.stop_token_ids or []), min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos, skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, logit_bias=logit_bias(body.logit_bias, vocab_size),
        json_schema=structured(body)[0], num_speculative_tokens=body.num_speculative_tokens)


def structured(body: CompletionRequest | ChatCompletionRequest
               ) -> tuple[dict[str, Any] | str | None, str | None]:
    """(the schema the answer must match, the request field it came from); (None, None)
    for free text. One of response_format, vLLM's guided_json / structured_outputs, or a
    forced tool call; vLLM's other constraints are refused (400), never ignored."""
    from kiln.serve.openai_tools import forced_tools, tool_call_schema

    _refuse_guided(body)
    sources = [(field, schema) for field, schema in (
        ("response_format", json_schema_of(getattr(body, "response_format", None))),
        ("guided_json", _schema_field("guided_json", body.guided_json)),
        ("structured_outputs", _structured_outputs(body.structured_outputs)))
        if schema is not None]
    functions = forced_tools(body)
    if functions is not None:
        sources.append(("tools", tool_call_schema(functions)))
    if len(sources) > 1:
        (first, _), (second, _) = sources[:2]
        what = {"tools": "a forced tool_choice"}
        raise APIError(400, f"{what.get(first, first)} and {what.get(second, second)} exclude "
                       "each other: give the answer one constraint", param=second)
    return (sources[0][1], sources[0][0]) if sources else (None, None)


# vLLM's constraints that kiln (JSON schemas only) cannot honour, and what to use instead.
_AS_JSON_STRING = " (the answer is then a quoted JSON string)"
_INSTEAD = {
    "choice": 'response_format {"type": "json_schema", "json_schema": {"schema": '
              '{"enum": [...]}}}' + _AS_JSON_STRING,
    "regex": 'response_format {"type": "json_schema", "json_schema": {"schema": {"type": '
             '"string", "pattern": ...}}}' + _AS_JSON_STRING,
    "grammar": "a JSON schema in response_format (kiln constrains answers to JSON schemas "
               "only)",
    "whitespace_pattern": "nothing: kiln's JSON has no free whitespace",
    "structural_tag": "response_format json_schema, or tools with tool_choice \"required\"",
}


def _refuse_guided(body: Any) -> None:
    for kind in ("choice", "regex", "grammar", "whitespace_pattern"):
        if getattr(body, f"guided_{kind}") is not None:
            raise APIError(400, f"guided_{kind} is not supported; use {_INSTEAD[kind]}",
                           param=f"guided_{kind}")
    backend = body.guided_decoding_backend
    if backend is not None and (not isinstance(backend, str) or
                                backend.split(":")[0] not in ("xgrammar", "auto")):
        raise APIError(400, f"guided_decoding_backend {backend!r} is not available: kiln "
                       'constrains answers with xgrammar ("xgrammar" or "auto")',
                       param="guided_decoding_backend")


def _schema_field(name: str, value: Any) -> dict[str, Any] | str | None:
    """A JSON schema given as an object or as JSON text (vLLM takes both)."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            if isinstance(json.loads(value), dict):
                return value
        except json.JSONDecodeError:
            pass
    raise APIError(400, f"{name} must be a JSON schema object", param=name.split(".")[0])


def _structured_outputs(options: Any) -> dict[str, Any] | str | None:
    """vLLM's structured_outputs: json (a schema) or json_object; its flags for
    whitespace, fallback and additional properties ask for what kiln always does."""
    if options is None:
        return None
    if not isinstance(options, dict):
        raise APIError(400, "structured_outputs must be an object", param="structured_outputs")
    for key, value in options.items():
        if key in _INSTEAD and value is not None:
            raise APIError(400, f"structured_outputs.{key} is not supported; use "
                           f"{_INSTEAD[key]}", param="structured_outputs")
        if key not in (*_INSTEAD, "json", "json_object", "disable_fallback",
                       "disable_any_whitespace", "disable_additional_properties"):
            raise APIError(400, f"structured_outputs.{key} is not a known option",
                           param="structured_outputs")
    schema = _schema_field("structured_outputs.json", options.get("json"))
    if options.get("json_object"):
        if schema is not None:
            raise APIError(400, "structured_outputs: json and json_object exclude each other",
                           param="structured_outputs")
        return {"type": "object"}
    return schema


def json_schema_of(response_format: Any) -> dict[str, Any] | None:
    """OpenAI's response_format -> the schema the output must match (None: free text)."""
    if not response_format:
        return None
    if not isinstance(response_format, dict):
        raise APIError(400, "response_format must be an object", param="response_format")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise APIError(400, "response_format json_schema needs json_schema.schema, a JSON "
                           "schema object", param="response_format")
        return spec["schema"]  # strict or not, the output always matches the schema
    raise APIError(400, f"response_format type {kind!r} is not supported (text, json_object,"
                   " json_schema)", param="response_format")


def logit_bias(bias: dict[str, float] | None, vocab_size: int | None
               ) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} as {int: float}; ids in the vocabulary, bias in
    [-100, 100]."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}",
                           param="logit_bias") from None
        if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
            raise APIError(400, f"logit_bias: token id {token_id} is not in the vocabulary "
                           f"(0 to {(vocab_size or 1) - 1})", param="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {value} for "
                           f"token {token_id}", param="logit_bias")
        out[token_id] = float(value)
    return out


async def start_call(ctx: ServeContext, route: str, prefix: str,
                     body: CompletionRequest | ChatCompletionRequest,
                     make_prompts: Callable[[], list[Prompt]], max_tokens: int | None,
                     logprobs: int | None, n: int | None = None,
                     prompt_logprobs: int | None = None, prompt_chars: int = 0,
                     request: Request | None = None) -> Call:
    """Check the request, make its prompts, submit it; every failure is logged. `n`: the
    engine's choices per prompt when not the body's (best_of); prompt_chars: how much
    text make_prompts works on (past INLINE_PROMPT_CHARS, it runs on a thread)."""
    call_id = f"{prefix}-{uuid.uuid4().hex}"
    tracker = ctx.metrics.track(call_id, route)
    try:
        check_unicode(body)
        ctx.check_model(body.model)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options needs stream: true", param="stream_options")
        prompts = await asyncio.to_thread(make_prompts) \
            if prompt_chars > INLINE_PROMPT_CHARS else make_prompts()
        if len(prompts) > MAX_CHOICES:
            raise APIError(400, f"a call takes at most {MAX_CHOICES} prompts (with n choices "
                           f"each, {MAX_CHOICES} choices in all), got {len(prompts)}",
                           param="prompt")
        n = body.n if n is None else n
        if body.n < 1 or len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"n must be in [1, {MAX_CHOICES // len(prompts)}]", param="n")
        if len(prompts) * n > MAX_CHOICES:
            raise APIError(400, f"best_of must be in [1, {MAX_CHOICES // len(prompts)}]",
                           param="best_of")
        params = sampling_params(body, max_tokens, logprobs, n, prompt_logprobs,
                                 ctx.llm.engine.config.model.vocab_size)
        group = [(prompt, params, f"{call_id}-{p}") for p, prompt in enumerate(prompts)]
        try:
            stream = await submit_watched(ctx, group, request)
        except RequestError as e:
            if not str(e).startswith("json_schema:"):
                raise
            where = structured(body)[1]  # the schema does not compile, or asks too much
            raise APIError(400, f"{where}: {str(e).removeprefix('json_schema:').strip()}",
                           param=where) from None
    except BaseException as e:
        tracker.finish(*(("aborted",) if isinstance(e, ClientDisconnected) else
                         ("error", str(e))))
        raise
    states = [ChoiceState(i, TextDeltas(params.stop)) for i in range(len(prompts) * n)]
    return Call(call_id, int(time.time()), ctx.model_name, n, stream, tracker,
                {rid: p for p, (_, _, rid) in enumerate(group)}, states)


async def collect(call: Call, request: Request) -> list[RequestOutput] | None:
    """Final outputs, one per prompt; None if the client went away first."""

    async def consume() -> None:
        async for output in call.stream:
            call.tracker.observe(output)

    try:
        await until_disconnect(request, consume())
    except ClientDisconnected:
        call.close()
        return None
    except Exception as e:
        call.tracker.finish("error", str(e))
        raise
    finally:
        call.stream.abort()
    call.tracker.finish("ok")
    return list(call.tracker.last.values())


def stream_response(call: Call, chunks: ChunkMaker, prelude: list[Any],
                    usage_chunk: Callable[[int, int], Any] | None) -> EventStreamResponse:
    """SSE: prelude chunks, chunks per output, an optional usage chunk, then [DONE].

    The events of one output go out in one body message (one socket write), and the last
    output's together with the usage chunk and [DONE]; the prelude goes out at once.
    """

    async def events() -> AsyncIterator[str]:
        if prelude:  # at once (the chat role chunk), before the first token
            yield "".join(sse(chunk) for chunk in prelude)
        pending = ""
        try:
            async for output in call.stream:
                call.tracker.observe(output)
                pending += "".join(sse(chunk) for completion, state in call.choices(output)
                                   for chunk in chunks(output, completion, state))
                if pending and not call.stream.finished:
                    yield pending
                    pending = ""
            if usage_chunk is not None:
                pending += sse(usage_chunk(*call.usage_counts(list(call.tracker.last.values()))))
            call.tracker.finish("ok")
        except Exception as e:
            error = api_error(e)
            call.tracker.finish("error", error.message)
            pending += sse({"error": {"message": error.message, "type": "server_error",
                                      "param": None, "code": error.code}})
        yield pending + "data: [DONE]\n\n"

    return EventStreamResponse(events(), call.close)


def disconnected_response() -> Response:
    # Nobody reads this; 499 is what proxies log for "client closed request".
    return Response(status_code=499)
