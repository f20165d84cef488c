"""LLMEngine.stream: one request's text as it is generated, pulled by its reader."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from kiln.runtime.request import SamplingParams
from kiln.runtime.text_deltas import TextDeltas

if TYPE_CHECKING:
    from kiln.runtime.engine import LLMEngine


def stream(engine: LLMEngine, prompt: str | list[int], params: SamplingParams | None
           ) -> Iterator[str]:
    """Run one request to the end, yielding its text as it is generated. Several streams of
    one engine may be read in turns: a step that one of them runs keeps the outputs of the
    others for them (their last pieces too; they were dropped before)."""
    request_id = engine.add_request(prompt, params)
    kept = engine.streamed
    kept[request_id] = None
    deltas = TextDeltas(params.stop)
    try:
        while True:
            output = kept[request_id]
            if output is None:
                if request_id not in engine.groups:
                    break
                for out in engine.step():
                    if out.request_id in kept:
                        kept[out.request_id] = out
                continue
            kept[request_id] = None
            delta = deltas.next(output.outputs[0].text, output.finished)
            if delta:
                yield delta
            if output.finished:
                break
    finally:
        kept.pop(request_id, None)
        engine.abort(request_id)
