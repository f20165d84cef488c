"""Speculative decoding's configuration (vLLM's speculative_config keys)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from kiln.errors import KilnError

METHODS = ("ngram", "draft_model")
# Keys of one method only: given to the other, they would be ignored, so they are refused.
_ONLY_FOR = {"prompt_lookup_min": "ngram", "prompt_lookup_max": "ngram",
             "model": "draft_model"}
# Draft-model draws use the request's seed xor this, so they are independent of the
# target's draws at the same positions.
DRAFT_SEED_SALT = 0x5DEECE66D


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config` keys."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1  # ngram: shortest suffix n-gram looked up
    prompt_lookup_max: int = 4  # ngram: longest, tried first
    model: str | None = None  # draft_model: engine dir, HF folder or GGUF
    # A request whose drafts keep failing pauses speculation (for 4, 16, 64, up to 256
    # tokens after its second miss in a row), so that it decodes as fast as without
    # speculation (overlapped steps) where drafts do not pay; false: always propose.
    adaptive: bool = True

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None
              ) -> SpeculativeConfig | None:
        """From a dict, a JSON string (the CLI flag) or None; KilnError on a bad value."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise KilnError(f"--speculative-config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise KilnError("speculative_config must be a JSON object, e.g. "
                            '{"method": "ngram", "num_speculative_tokens": 4}')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known, key=str)
        if unknown:
            raise KilnError(f"unknown speculative_config keys {unknown}; known: {sorted(known)}")
        method = value.get("method")
        if method is None and value.get("model"):
            method = "draft_model"
        if method not in METHODS:
            raise KilnError(f"speculative_config method must be one of {METHODS}, "
                            f"got {method!r}")
        foreign = sorted(key for key in _ONLY_FOR if _ONLY_FOR[key] != method and
                         value.get(key) is not None)
        if foreign:
            raise KilnError(f"speculative_config {', '.join(foreign)} "
                            f"{'does' if len(foreign) == 1 else 'do'} not apply to method "
                            f"{method!r} (only to {_ONLY_FOR[foreign[0]]!r})")
        k = value.get("num_speculative_tokens")
        if not _whole(k) or not 1 <= k <= 32:
            raise KilnError("speculative_config needs num_speculative_tokens, an integer in "
                            f"[1, 32], got {k!r}")
        config = cls(**{**value, "method": method})
        lo, hi = config.prompt_lookup_min, config.prompt_lookup_max
        if method == "ngram" and not (_whole(lo) and _whole(hi) and 1 <= lo <= hi):
            raise KilnError("speculative_config needs 1 <= prompt_lookup_min <= "
                            f"prompt_lookup_max, got {lo!r} and {hi!r}")
        if method == "draft_model" and (not config.model or
                                        not isinstance(config.model, (str, os.PathLike))):
            raise KilnError('speculative_config method "draft_model" needs "model": an '
                            "engine dir, HF folder or GGUF file of the draft (a path), got "
                            f"{config.model!r}")
        if not isinstance(config.adaptive, bool):
            raise KilnError(f"speculative_config adaptive must be true or false, got "
                            f"{config.adaptive!r}")
        return config

    def check_layout(self, tp_size: int, pp_size: int) -> None:
        """Several ranks: n-gram drafts on tensor parallel only (each rank proposes the same
        drafts from the same tokens); a draft model or pipeline stages are refused."""
        if tp_size * pp_size > 1 and (self.method != "ngram" or pp_size > 1):
            raise KilnError("speculative decoding on several GPUs takes the ngram method on "
                            f"tensor-parallel engines (this one: {self.method}, tp {tp_size} "
                            f"x pp {pp_size})")


def _whole(value: Any) -> bool:
    """An int, and not a bool (True would read as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)
