"""Serving: AsyncLLM (asyncio front of the engine) and the HTTP app around it.

Imports are lazy so that `kiln --help` does not pull in torch or FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.serve.app import ServerConfig, build_app
    from kiln.serve.async_llm import AsyncLLM
    from kiln.serve.server import ServerThread

__all__ = ["AsyncLLM", "ServerConfig", "ServerThread", "build_app"]

_HOMES = {"AsyncLLM": "kiln.serve.async_llm", "ServerConfig": "kiln.serve.app",
          "build_app": "kiln.serve.app", "ServerThread": "kiln.serve.server"}


def __getattr__(name: str):  # noqa: ANN202
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(name)
