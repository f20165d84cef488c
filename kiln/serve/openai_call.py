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

from kiln.errors import PromptTooLongError, RequestError
from kiln.runtime.request import (
    CONSTRAINTS,
    INT64,
    CompletionOutput,
    RequestOutput,
    SamplingParams,
)
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

    def usage_counts(self, outputs: list[RequestOutput]) -> tuple[int, int, int]:
        """(prompt tokens, completion tokens, prompt tokens read from the prefix cache)."""
        return (sum(len(out.prompt_token_ids) for out in outputs),
                sum(len(c.token_ids) for out in outputs for c in out.outputs),
                sum(out.metrics.num_cached_tokens for out in outputs if out.metrics))


def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None,
                    logprobs: int | None, n: int | None = None,
                    prompt_logprobs: int | None = None, vocab_size: int | None = None
                    ) -> SamplingParams:
    """The engine's parameters; raises RequestError (400) on bad values. `n` overrides
    the body's (best_of candidates)."""
    n = body.n if n is None else n
    # Checked here because a bad value would fail the engine step of the whole batch.
    # Choice i samples with seed + i: the last, seed + n - 1, must fit in an int64 too.
    if body.seed is not None and not -INT64 <= body.seed <= INT64 - max(n, 1):
        raise APIError(400, f"seed must be in [-2**63, 2**63 - {max(n, 1)}] (choice i of n "
                       "samples with seed + i, a signed 64-bit integer)", param="seed")
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
        allowed_token_ids=body.allowed_token_ids,
        ignore_eos=body.ignore_eos, skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, logit_bias=logit_bias(body.logit_bias, vocab_size),
        **constraint_fields(structured(body)[0]),
        num_speculative_tokens=body.num_speculative_tokens)


def constraint_fields(constraint: tuple[str, Any] | None) -> dict[str, Any]:
    """SamplingParams' keyword for a (kind, value) constraint: json_schema, regex, ..."""
    return {} if constraint is None else {constraint[0]: constraint[1]}


def structured(body: CompletionRequest | ChatCompletionRequest
               ) -> tuple[tuple[str, Any] | None, str | None]:
    """((kind, value) the answer must match, the request field it came from); (None, None)
    for free text. One of response_format, vLLM's guided_json / guided_regex /
    guided_choice / guided_grammar / structured_outputs, or a forced tool call."""
    from kiln.serve.openai_tools import forced_tools, tool_call_schema

    _check_backend(body)
    sources = [(field, c) for field, c in (
        ("response_format", _schema(json_schema_of(getattr(body, "response_format", None)))),
        ("guided_json", _schema(_schema_field("guided_json", body.guided_json))),
        ("guided_regex", _text("guided_regex", "regex", body.guided_regex)),
        ("guided_choice", _choice("guided_choice", body.guided_choice)),
        ("guided_grammar", _text("guided_grammar", "grammar", body.guided_grammar)),
        ("structured_outputs", _structured_outputs(body.structured_outputs)))
        if c is not None]
    functions = forced_tools(body)
    if functions is not None:
        sources.append(("tools", ("json_schema", tool_call_schema(functions))))
    if len(sources) > 1:
        (first, _), (second, _) = sources[:2]
        what = {"tools": "a forced tool_choice"}
        raise APIError(400, f"{what.get(first, first)} and {what.get(second, second)} exclude "
                       "each other: give the answer one constraint", param=second)
    return (sources[0][1], sources[0][0]) if sources else (None, None)


def _schema(schema: Any) -> tuple[str, Any] | None:
    return None if schema is None else ("json_schema", schema)


def _text(name: str, kind: str, value: Any) -> tuple[str, str] | None:
    """A regular expression or an EBNF grammar: a non-empty string."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{name} must be a non-empty string", param=name.split(".")[0])
    return kind, value


def _choice(name: str, value: Any) -> tuple[str, list[str]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(
            isinstance(c, str) and c for c in value):
        raise APIError(400, f"{name} must be a list of non-empty strings",
                       param=name.split(".")[0])
    return "choice", value


def _check_backend(body: Any) -> None:
    if body.guided_whitespace_pattern is not None:
        raise APIError(400, "guided_whitespace_pattern is not supported: kiln's JSON has no "
                       "free whitespace", param="guided_whitespace_pattern")
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
        except RecursionError:
            raise APIError(400, f"{name}: the schema is nested too deeply",
                           param=name.split(".")[0]) from None
    raise APIError(400, f"{name} must be a JSON schema object", param=name.split(".")[0])


def _structured_outputs(options: Any) -> tuple[str, Any] | None:
    """vLLM's structured_outputs: one of json (a schema), json_object, regex, choice or
    grammar; its flags for whitespace, fallback and additional properties ask for what
    kiln always does."""
    if options is None:
        return None
    if not isinstance(options, dict):
        raise APIError(400, "structured_outputs must be an object", param="structured_outputs")
    for key, value in options.items():
        if key in ("structural_tag", "whitespace_pattern") and value is not None:
            raise APIError(400, f"structured_outputs.{key} is not supported; use response_format"
                           " json_schema (or tools with tool_choice \"required\")",
                           param="structured_outputs")
        if key not in ("structural_tag", "whitespace_pattern", "json", "json_object", "regex",
                       "choice", "grammar", "disable_fallback", "disable_any_whitespace",
                       "disable_additional_properties"):
            raise APIError(400, f"structured_outputs.{key} is not a known option",
                           param="structured_outputs")
    given = [c for c in (
        _schema(_schema_field("structured_outputs.json", options.get("json"))),
        _schema({"type": "object"} if options.get("json_object") else None),
        _text("structured_outputs.regex", "regex", options.get("regex")),
        _choice("structured_outputs.choice", options.get("choice")),
        _text("structured_outputs.grammar", "grammar", options.get("grammar")))
        if c is not None]
    if len(given) > 1:
        raise APIError(400, "structured_outputs: give one of json, json_object, regex, choice "
                       "and grammar", param="structured_outputs")
    return given[0] if given else None


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
            if isinstance(e, PromptTooLongError):  # OpenAI's code and field, for clients
                raise APIError(400, str(e), code="context_length_exceeded", param="messages"
                               if isinstance(body, ChatCompletionRequest) else "prompt") from None
            kind = str(e).split(":")[0]
            if kind not in CONSTRAINTS:
                raise
            where = structured(body)[1]  # the constraint does not compile, or asks too much
            raise APIError(400, f"{where}: {str(e).removeprefix(kind + ':').strip()}",
                           param=where) from None
    except BaseException as e:
        tracker.finish(*(("aborted",) if isinstance(e, ClientDisconnected) else
                         ("error", str(e))))
        raise
    states = [ChoiceState(i, TextDeltas(params.stop)) for i in range(len(prompts) * n)]
    return Call(call_id, int(time.time()), ctx.model_name, n, stream, tracker,
                {rid: p for p, (_, _, rid) in enumerate(group)}, states)


async def collect(call: Call, request: Request,
                  view: Callable[[RequestOutput], RequestOutput] | None = None
                  ) -> list[RequestOutput] | None:
    """Final outputs, one per prompt; None if the client went away first. `view`: what
    the answer makes of each output (max_tokens 0 leaves out the one token computed), so
    that metrics and the request log count what the client gets."""

    async def consume() -> None:
        async for output in call.stream:
            call.tracker.observe(output if view is None else view(output))

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
                    usage_chunk: Callable[..., Any] | None) -> EventStreamResponse:
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
