"""kiln: build a pretrained LLM into a fast engine, then run and serve it."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from kiln.llm import LLM
    from kiln.runtime.request import SamplingParams

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import kiln` (e.g. for the CLI's --help) does not import torch.
    if name == "LLM":
        from kiln.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kiln.runtime.request import SamplingParams

        return SamplingParams
    raise AttributeError(name)
