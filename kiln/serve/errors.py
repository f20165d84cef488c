"""HTTP errors: every failure becomes a JSON body in the schema of the API that was called.

OpenAI routes answer `{"error": {"message", "type", "param", "code"}}`; KServe v2 routes
answer `{"error": "message"}` as that protocol says. No traceback ever reaches a client:
unexpected exceptions are logged here and answered with a plain 500.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from kiln.errors import KilnError, RequestError
from kiln.serve.async_llm import QueueFullError
from kiln.serve.engine_loop import EngineDeadError, EngineStepError
from kiln.serve.streaming import ClientDisconnected
from kiln.tokenizer import lone_surrogate, not_unicode

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable"}


class APIError(Exception):
    """An error answered with `status`; raised by the route handlers."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def check_unicode(body: Any) -> None:
    """A 400 naming the first string of a request (pydantic models, dicts, lists) that is
    not valid Unicode; its param is the top-level field."""
    found = _lone_surrogate_in(body, "")
    if found is not None:
        where, text, at = found
        raise APIError(400, f"{where} {not_unicode(text, at)}",
                       param=re.split(r"[.\[ ]", where, maxsplit=1)[0] or None)


def _lone_surrogate_in(value: Any, where: str) -> tuple[str, str, int] | None:
    """(where, the string, the surrogate's position) of the first lone surrogate."""
    if isinstance(value, str):
        at = lone_surrogate(value)
        return None if at is None else (where, value, at)
    if isinstance(value, BaseModel | dict):
        items = vars(value).items() if isinstance(value, BaseModel) else value.items()
        for key, item in items:
            key = str(key)
            at = lone_surrogate(key)
            if at is not None:
                return (f"{where} (a key)" if where else "a key", key, at)
            found = _lone_surrogate_in(item, f"{where}.{key}" if where else key)
            if found is not None:
                return found
    elif isinstance(value, list | tuple) and not set(map(type, value)) <= _NOT_TEXT:
        for i, item in enumerate(value):  # not a list of numbers (token ids)
            found = _lone_surrogate_in(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None


_NOT_TEXT = {int, float, bool, type(None)}


def error_body(path: str, status: int, message: str, param: str | None = None,
               code: str | None = None) -> bytes:
    if path.startswith("/v2"):
        return json.dumps({"error": message}).encode()
    error = {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
             "code": code}
    return json.dumps({"error": error}).encode()


def error_response(request: Request, error: APIError,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = error_body(request.url.path, error.status, error.message, error.param, error.code)
    headers = {**(headers or {}), **({"Retry-After": "1"} if error.status == 429 else {})}
    return JSONResponse(json.loads(body), status_code=error.status, headers=headers)


def api_error(exc: BaseException) -> APIError:
    """Map an exception raised while serving a request to what the client is told."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), code="queue_full")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_stopped")
    if isinstance(exc, EngineStepError):
        return APIError(500, str(exc), code="engine_error")
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), param=_param_of(str(exc)))
    if isinstance(exc, KilnError):
        return APIError(400, str(exc))
    log.error("unexpected error while serving a request", exc_info=exc)
    return APIError(500, "internal server error", code="internal_error")


_PARAM_NAME = re.compile(r"^([a-z_]+)(?: (?:must|is|are) | -?\d+: |: )")


def _param_of(message: str) -> str | None:
    """Request checks start with the parameter's name: "top_p must be ...",
    "logit_bias: token id ...", "num_speculative_tokens 4: this engine ..."."""
    match = _PARAM_NAME.match(message)
    return match.group(1) if match else None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg', '')}", None
    parts, param = [], None
    for error in errors[:3]:
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(request, APIError(400, message, param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no route for {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed here"}.get(
                       exc.status_code, str(exc.detail))
        code = "request_too_large" if exc.status_code == 413 else None  # a chunked body
        # Its headers too: a 405 names the methods the route takes (Allow), as HTTP says.
        return error_response(request, APIError(exc.status_code, message, code=code),
                              exc.headers)

    async def _known(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, api_error(exc))

    async def _gone(request: Request, exc: Exception) -> Response:
        # The client left before its requests were accepted (they were aborted); nobody
        # reads this, 499 is what proxies log for "client closed request".
        return Response(status_code=499)

    app.add_exception_handler(ClientDisconnected, _gone)
    app.add_exception_handler(APIError, _known)
    app.add_exception_handler(KilnError, _known)
    # Anything else is a bug: Starlette answers with this handler, then re-raises so
    # that uvicorn logs the traceback on the server's side.
    app.add_exception_handler(Exception, _known)
