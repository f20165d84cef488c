"""kiln: build a pretrained LLM into a fast engine, then run and serve it.

    from kiln import LLM, SamplingParams
    llm = LLM("path/to/hf-folder-or.gguf-or-engine-dir")   # None: the default model
    print(llm.generate("The capital of France is", SamplingParams(max_tokens=8))[0].text)

Public names (imported lazily, so `import kiln` stays fast):
- `LLM`: offline generation, chat and beam search over an engine.
- `SamplingParams`: per-request sampling (greedy, temperature, top-k/p, min-p, penalties,
  seeds, stop strings, logprobs, n).
- `BeamSearchParams`: beam width, length penalty, early stopping for `LLM.beam_search`.
- `RequestOutput`: what `generate` returns per prompt (text, token ids, finish reason).
- `AsyncLLM`: the asyncio front used by the server (needs `pip install 'kiln[serve]'`
  only for the HTTP app, not for AsyncLLM itself).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

if TYPE_CHECKING:
    from kiln.llm import LLM
    from kiln.runtime.beam_search import BeamSearchParams
    from kiln.runtime.request import RequestOutput, SamplingParams
    from kiln.serve.async_llm import AsyncLLM

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "AsyncLLM",
           "__version__"]

_HOMES = {"LLM": "kiln.llm", "SamplingParams": "kiln.runtime.request",
          "BeamSearchParams": "kiln.runtime.beam_search",
          "RequestOutput": "kiln.runtime.request", "AsyncLLM": "kiln.serve.async_llm"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'kiln' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
