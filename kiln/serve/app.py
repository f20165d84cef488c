"""The FastAPI app: OpenAI and KServe v2 routes, health, metrics, guards, error handlers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

import kiln
from kiln.serve import kserve, openai_api
from kiln.serve.async_llm import AsyncLLM
from kiln.serve.context import ServeContext, get_context
from kiln.serve.errors import install_error_handlers
from kiln.serve.metrics import ServerMetrics
from kiln.serve.middleware import GuardMiddleware, MetricsMiddleware
from kiln.serve.tokens import TokenTexts


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless asked: the API key is optional
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    served_model_name: str | None = None  # None: from the model's file or folder name
    log_level: str = "info"
    shutdown_timeout: float = 30.0  # SIGTERM / Ctrl-C: seconds running requests may finish


def default_model_name(llm: AsyncLLM) -> str:
    """The source checkpoint's name (e.g. "SmolLM2-135M-Instruct.Q4_1"), URL-safe."""
    engine = llm.engine
    source = (engine.config.source or {}).get("path")
    path = Path(source) if source else engine.engine_dir
    name = path.stem if path.suffix.lower() == ".gguf" else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "kiln"


def _static(name: str) -> bytes:
    from importlib.resources import files

    return files("kiln.serve").joinpath("static", name).read_bytes()


def build_app(llm: AsyncLLM, config: ServerConfig | None = None) -> FastAPI:
    """An app serving `llm`; the caller owns `llm` (starts and shuts it down)."""
    config = config or ServerConfig()
    app = FastAPI(title="kiln", version=kiln.__version__)
    metrics = ServerMetrics(llm.stats)
    ctx = app.state.kiln = ServeContext(
        llm, config.served_model_name or default_model_name(llm), metrics,
        TokenTexts(llm.tokenizer))
    install_error_handlers(app)
    app.include_router(openai_api.router)
    app.include_router(kserve.router)

    @app.get("/health")
    async def health(ctx: ServeContext = Depends(get_context)) -> Response:
        status = "shutting down" if ctx.draining else "ok" if ctx.llm.alive else "engine stopped"
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    # The playground: a static page and its script (they hold no secrets, so they are
    # served without the API key; the page sends the key the user types with its calls).
    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        return Response(_static("playground.html"), media_type="text/html; charset=utf-8")

    @app.get("/playground.js", include_in_schema=False)
    async def playground_js() -> Response:
        return Response(_static("playground.js"), media_type="text/javascript; charset=utf-8")

    @app.get("/metrics")
    async def prometheus(ctx: ServeContext = Depends(get_context)) -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # The last added runs first: count every response, including the guard's refusals.
    app.add_middleware(GuardMiddleware, api_key=config.api_key,
                       max_body_bytes=config.max_body_bytes, draining=lambda: ctx.draining)
    app.add_middleware(MetricsMiddleware, metrics=metrics,
                       routers=[app.router, openai_api.router, kserve.router])
    return app
