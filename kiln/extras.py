"""Optional dependencies: which `pip install 'kiln[EXTRA]'` brings each one."""

from __future__ import annotations

import importlib.util
import sys

# top-level module -> extra that installs it
EXTRAS = {
    "fastapi": "serve", "uvicorn": "serve", "pydantic": "serve", "prometheus_client": "serve",
    "httpx": "serve", "triton": "gpu", "transformers": "hf", "accelerate": "hf",
    "matplotlib": "plot", "rouge_score": "eval", "lm_eval": "eval", "xgrammar": "structured",
}


def missing_extra_message(module: str | None) -> str | None:
    """One line for a missing optional module, None if it is not an optional one."""
    top = (module or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return (f"this needs the optional package {top!r}, which is not installed: "
            f"pip install 'kiln[{extra}]'")


def has(module: str) -> bool:
    if module in sys.modules:  # imported, or blocked with None
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None
