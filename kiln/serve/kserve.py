"""KServe v2 / Triton routes: health, server and model metadata, inference with tensors
(`/infer`, see kserve_infer.py) and Triton's generate extension (`/generate`,
`/generate_stream`), so Triton clients and load balancers work.

The model has one version, "1". Errors follow the v2 protocol: `{"error": "message"}`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Body, Depends, Request, Response
from fastapi.responses import JSONResponse

import kiln
from kiln.errors import RequestError
from kiln.runtime.request import RequestOutput
from kiln.runtime.text_deltas import TextDeltas
from kiln.serve.context import ServeContext, get_context
from kiln.serve.errors import APIError, api_error
from kiln.serve.generate_params import INPUTS, OUTPUTS, GenerateInput, parse_generate_request
from kiln.serve.kserve_infer import InferRequest, infer_response, read_infer_request
from kiln.serve.metrics import RequestTracker
from kiln.serve.streaming import (
    ClientDisconnected,
    EventStreamResponse,
    sse,
    submit_watched,
    until_disconnect,
)

router = APIRouter(prefix="/v2")

VERSION = "1"


def _model(ctx: ServeContext, name: str, version: str) -> None:
    ctx.check_model(name, status=404)
    if version != VERSION:
        raise APIError(404, f"model {name!r} has no version {version!r}; it has {VERSION!r}")


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": "kiln", "version": kiln.__version__,
            "extensions": ["generate", "binary_tensor_data"]}


@router.get("/health/live")
async def live() -> dict[str, Any]:
    return {"live": True}


@router.get("/health/ready")
async def ready(ctx: ServeContext = Depends(get_context)) -> Response:
    ready = ctx.ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(name: str, version: str = VERSION,
                         ctx: ServeContext = Depends(get_context)) -> dict[str, Any]:
    _model(ctx, name, version)

    def tensors(specs: list[tuple[str, str, list[int]]]) -> list[dict[str, Any]]:
        return [{"name": n, "datatype": d, "shape": s} for n, d, s in specs]

    return {"name": ctx.model_name, "versions": [VERSION], "platform": "kiln",
            "inputs": tensors(INPUTS), "outputs": tensors(OUTPUTS)}


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(name: str, version: str = VERSION,
                      ctx: ServeContext = Depends(get_context)) -> Response:
    _model(ctx, name, version)
    ready = ctx.ready
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


async def _start(ctx: ServeContext, name: str, version: str, parse: Callable[[], Any],
                 route: str, request: Request | None = None
                 ) -> tuple[GenerateInput, Any, RequestTracker]:
    """Check the model, parse the request (`parse` -> GenerateInput), submit it."""
    request_id = f"gen-{uuid.uuid4().hex}"
    tracker = ctx.metrics.track(request_id, route)
    try:
        _model(ctx, name, version)
        parsed = parse()
        stream = await submit_watched(ctx, [(parsed.text, parsed.params, request_id)], request)
    except BaseException as e:
        tracker.finish(*(("aborted",) if isinstance(e, ClientDisconnected) else
                         ("error", str(e))))
        raise
    return parsed, stream, tracker


async def _whole(request: Request, stream: Any, tracker: RequestTracker
                 ) -> RequestOutput | None | Response:
    """The final output of a request that is answered in one piece (or a 499 response)."""

    async def consume() -> RequestOutput | None:
        last = None
        async for last in stream:
            tracker.observe(last)
        return last

    try:
        output = await until_disconnect(request, consume())
    except ClientDisconnected:
        tracker.finish("aborted")
        return Response(status_code=499)
    except Exception as e:
        tracker.finish("error", str(e))
        raise
    finally:
        stream.abort()
    tracker.finish("ok")
    return output


def _reply(ctx: ServeContext, text: str, **extra: Any) -> dict[str, Any]:
    return {"model_name": ctx.model_name, "model_version": VERSION, "text_output": text,
            **extra}


@router.post("/models/{name}/generate")
@router.post("/models/{name}/versions/{version}/generate")
async def generate(name: str, request: Request, body: Any = Body(...), version: str = VERSION,
                   ctx: ServeContext = Depends(get_context)) -> Any:
    def parse() -> Any:
        parsed = parse_generate_request(body)
        if parsed.stream:
            raise RequestError("stream is not supported by generate; use generate_stream")
        return parsed

    parsed, stream, tracker = await _start(ctx, name, version, parse,
                                           "/v2/models/{name}/generate", request)
    output = await _whole(request, stream, tracker)
    if isinstance(output, Response):
        return output
    text = output.text if output else ""
    if not parsed.exclude_input_in_output:
        text = parsed.text + text
    return _reply(ctx, text, finish_reason=output.finish_reason if output else None)


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request, version: str = VERSION,
                ctx: ServeContext = Depends(get_context)) -> Response:
    infer_request: InferRequest | None = None

    def parse() -> GenerateInput:
        nonlocal infer_request
        infer_request = read_infer_request(
            body, request.headers.get("inference-header-content-length"))
        parsed = parse_generate_request(infer_request.values)
        if parsed.stream:
            raise RequestError("stream is not supported by infer; use generate_stream")
        return parsed

    body = await request.body()
    parsed, stream, tracker = await _start(ctx, name, version, parse,
                                           "/v2/models/{name}/infer", request)
    output = await _whole(request, stream, tracker)
    if isinstance(output, Response):
        return output
    assert infer_request is not None
    text = output.text if output else ""
    if not parsed.exclude_input_in_output:
        text = parsed.text + text
    content, headers = infer_response(ctx.model_name, VERSION, infer_request.id, text,
                                      output.finish_reason if output else None,
                                      infer_request.binary_output)
    return Response(content, headers=headers)


@router.post("/models/{name}/generate_stream")
@router.post("/models/{name}/versions/{version}/generate_stream")
async def generate_stream(name: str, request: Request, body: Any = Body(...),
                          version: str = VERSION,
                          ctx: ServeContext = Depends(get_context)) -> EventStreamResponse:
    parsed, stream, tracker = await _start(ctx, name, version,
                                           lambda: parse_generate_request(body),
                                           "/v2/models/{name}/generate_stream", request)
    deltas = TextDeltas(parsed.params.stop)

    async def events() -> AsyncIterator[str]:
        try:
            async for output in stream:
                tracker.observe(output)
                delta = deltas.next(output.text, output.finished)
                if delta or output.finished:
                    finish = output.finish_reason if output.finished else None
                    yield sse(_reply(ctx, delta, finish_reason=finish))
            tracker.finish("ok")
        except Exception as e:
            error = api_error(e)
            tracker.finish("error", error.message)
            yield sse({"error": error.message})

    def close() -> None:
        stream.abort()
        tracker.finish("aborted")

    return EventStreamResponse(events(), close)
