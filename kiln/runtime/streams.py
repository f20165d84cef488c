"""LLMEngine.stream: one request's text as it is generated, pulled by its reader."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from kiln.errors import RequestError
from kiln.runtime.request import SamplingParams
from kiln.runtime.text_deltas import TextDeltas

if TYPE_CHECKING:
    from kiln.runtime.engine import LLMEngine


def stream(engine: LLMEngine, prompt: str | list[int], params: SamplingParams | None
           ) -> Iterator[str]:
    """Run one request to the end, yielding its text as it is generated; the pieces join
    into the final text. While a stop string could still match, up to len(longest stop
    string) - 1 characters are held back (as vLLM does): the engine cuts a stop string from
    the text, and a piece already yielded cannot be taken back.

    Several streams of one engine may be read in turns, and other calls may run the engine
    between two pieces (LLM.generate, LLM.beam_search, engine.step): whoever runs a step
    keeps this stream's output for it (LLMEngine._apply), so it still yields its whole
    text. One sequence only: n > 1 is a RequestError (LLM.generate or AsyncLLM.generate
    give every sequence)."""
    params = params or SamplingParams()
    params.validate()  # here, not at the first next(): n must be known now
    if params.n != 1:
        raise RequestError(f"stream() yields the text of one sequence, and n={params.n} asks "
                           f"for {params.n}: use LLM.generate, or AsyncLLM.generate for "
                           "outputs as they grow")
    return _pieces(engine, prompt, params)


def _pieces(engine: LLMEngine, prompt: str | list[int], params: SamplingParams
            ) -> Iterator[str]:
    # An LLM's engine has a lock (steps from other threads): take the kept output and
    # clear it in one go, or another thread's step could write the last one in between.
    lock = getattr(engine, "lock", None) or contextlib.nullcontext()
    request_id = engine.add_request(prompt, params)
    kept = engine.streamed
    kept[request_id] = None
    deltas = TextDeltas(params.stop)
    try:
        while True:
            with lock:
                output, kept[request_id] = kept[request_id], None
                gone = output is None and request_id not in engine.groups
            if gone:
                break  # aborted
            if output is None:
                engine.step()  # keeps the outputs of every stream in `kept`
                continue
            delta = deltas.next(output.outputs[0].text, output.finished)
            if delta:
                yield delta
            if output.finished:
                break
    finally:
        kept.pop(request_id, None)
        engine.abort(request_id)
