"""Streamed text deltas: kiln.runtime.text_deltas (shared with LLMEngine.stream and
AsyncLLM.generate), under the name the server's routes import."""

from __future__ import annotations

from kiln.runtime.text_deltas import TextDeltas, stop_holdback

__all__ = ["TextDeltas", "stop_holdback"]
