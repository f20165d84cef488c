"""What every route needs: the engine front, the served name, metrics, server limits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from kiln.serve.async_llm import AsyncLLM
from kiln.serve.errors import APIError
from kiln.serve.metrics import ServerMetrics
from kiln.serve.tokens import TokenTexts


@dataclass
class ServeContext:
    llm: AsyncLLM
    model_name: str
    metrics: ServerMetrics
    tokens: TokenTexts
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False  # a graceful shutdown began: new requests get 503

    @property
    def ready(self) -> bool:
        return self.llm.alive and not self.draining

    def check_model(self, name: str | None, status: int = 404) -> None:
        """`name` must be the served model's (None means it): else a 404, as OpenAI and
        vLLM answer an unknown model (openai.NotFoundError)."""
        if name is not None and name != self.model_name:
            raise APIError(status, f"the model {name!r} does not exist; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")


def get_context(request: Request) -> ServeContext:
    return request.app.state.kiln
