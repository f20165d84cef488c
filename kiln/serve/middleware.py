"""ASGI middleware: API key, request body size limit, draining, HTTP status counting.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would put streamed
responses through an extra task and hide client disconnects from the routes.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.serve.errors import error_body
from kiln.serve.metrics import ServerMetrics

# Probes must work without credentials (load balancers, Kubernetes).
_OPEN_PATHS = ("/health", "/v2/health/live", "/v2/health/ready",
               "/", "/playground.js")  # the playground page; its API calls carry the key


def _is_open(path: str) -> bool:
    return path in _OPEN_PATHS or (path.startswith("/v2/models/") and path.endswith("/ready"))


class _BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body parsing passes it on as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes")


async def _send_error(scope: Scope, send: Send, status: int, message: str,
                      code: str | None, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = error_body(scope.get("path", ""), status, message, code=code)
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Rejects requests without the API key (401), bodies over `max_body_bytes` (413),
    and, while the server drains before it stops, every new request but probes and
    /metrics (503; the probes answer 503 themselves). POST bodies of the OpenAI routes are
    read as JSON whatever content type they declare."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int,
                 draining: Callable[[], bool] = lambda: False) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining() and not _is_open(scope["path"]) and scope["path"] != "/metrics":
            await _send_error(scope, send, 503, "the server is shutting down",
                              "shutting_down", [(b"connection", b"close")])
            return
        headers = dict(scope.get("headers", ()))
        kind = headers.get(b"content-type", b"")
        if scope.get("method") == "POST" and (
                scope["path"].startswith("/v1/") and not kind.startswith(b"application/json")
                or scope["path"].startswith("/v2/")
                and kind in (b"", b"application/x-www-form-urlencoded")):
            # The OpenAI routes take JSON only, and /v2 JSON or binary tensors: read a body
            # sent without its type (curl -d sends form encoding) as the JSON it is. In
            # place: the route the router records in the scope must reach MetricsMiddleware.
            scope["headers"] = [(k, v) for k, v in scope.get("headers", ())
                                if k != b"content-type"] + [(b"content-type", b"application/json")]
        if self.api_key and not _is_open(scope["path"]) and not self._authorized(headers):
            await _send_error(scope, send, 401, "a valid API key is required: send "
                              "'Authorization: Bearer <key>'", "invalid_api_key",
                              [(b"www-authenticate", b"Bearer")])
            return
        declared = headers.get(b"content-length")
        limit = self.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(scope, send, 413, f"the request body exceeds {limit} bytes",
                              "request_too_large")
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            # Bodies sent without a length (chunked) are counted as they arrive.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge as e:
            if not started:
                await _send_error(scope, send, 413, e.detail, "request_too_large")

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)


def _route_name(scope: Scope, routers: Sequence[Any]) -> str:
    """The route template that served the request, or would have (a request the guard
    refused before routing: 401, 413, 503), matched as the router does; else "unmatched".
    `routers`: those whose routes the app serves (FastAPI wraps included routers in
    objects of its own, without a path: their routes are matched from their router)."""
    route = scope.get("route")
    if route is None:
        partial = None
        for candidate in (r for router in routers for r in router.routes):
            if getattr(candidate, "path", None) is None:
                continue
            match, _ = candidate.matches(scope)
            if match is Match.FULL:
                route = candidate
                break
            if match is Match.PARTIAL and partial is None:
                partial = candidate  # the path, another method: the router's 405
        route = route or partial
    return getattr(route, "path", None) or "unmatched"


class MetricsMiddleware:
    """Counts responses by route template (not raw path: model names stay out of labels)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routers: Sequence[Any] = ()
                 ) -> None:
        self.app = app
        self.metrics = metrics
        self.routers = routers  # to name the route of requests refused before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.in_flight -= 1
            self.metrics.http_requests.labels(_route_name(scope, self.routers),
                                              str(status)).inc()
