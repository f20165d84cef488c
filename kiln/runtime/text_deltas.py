"""Streamed text: the new part of a growing text, minus what may become a stop string.

Shared by every streaming front (LLMEngine.stream, AsyncLLM.generate, the HTTP server's
routes): text that is sent can never be taken back, so characters that could be the start
of a stop string the engine will cut are held until they cannot be.
"""

from __future__ import annotations


def stop_holdback(stop: list[str]) -> int:
    """Characters to hold back: a stop string may be completed by later tokens, the engine
    then cuts it from the text, and text already sent cannot be taken back."""
    return max((len(s) for s in stop), default=1) - 1


class TextDeltas:
    def __init__(self, stop: list[str] | None = None) -> None:
        self.holdback = stop_holdback(stop or [])
        self.sent = 0  # characters sent so far

    def next(self, text: str, finished: bool) -> str:
        """The text to send now, given the whole text so far."""
        end = len(text) if finished else max(len(text) - self.holdback, self.sent)
        delta = text[self.sent:end]
        self.sent = max(end, self.sent)
        return delta
