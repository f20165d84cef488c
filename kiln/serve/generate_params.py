"""Inputs of Triton's generate extension (and of kiln's Triton Python backend model).

A request names `text_input` and any of the parameters below, at the top level or
nested under `parameters` (both are how Triton clients send them). Triton's tensors of
shape [1] arrive as one-element lists, which are unwrapped. Names follow TensorRT-LLM's
and vLLM's Triton backends where they differ (`random_seed`, `stop_words`, ...). This
module imports neither FastAPI nor Triton, so both front ends share it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kiln.errors import RequestError
from kiln.runtime.request import SamplingParams
from kiln.tokenizer import lone_surrogate, not_unicode


def _scalar(name: str, value: Any) -> Any:
    while isinstance(value, list | tuple) and len(value) == 1:
        value = value[0]
    if isinstance(value, list | tuple):
        raise RequestError(f"{name} must be a single value, got {len(value)}")
    if hasattr(value, "item"):  # a numpy scalar from a Triton tensor
        value = value.item()
    return utf8(name, value) if isinstance(value, bytes) else value


def utf8(name: str, raw: bytes) -> str:
    """A BYTES element as text; RequestError naming the input if it is not UTF-8."""
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise RequestError(f"{name} must be UTF-8 text ({e.reason}: 0x{raw[e.start]:02x} at "
                           f"byte {e.start})") from None


def _int(name: str, value: Any) -> int:
    value = _scalar(name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not math.isfinite(value) or value != int(value):  # JSON's Infinity: int() raises
        raise RequestError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _float(name: str, value: Any) -> float:
    value = _scalar(name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RequestError(f"{name} must be a number, got {value!r}")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    value = _scalar(name, value)
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {value!r}")
    return value


def _strings(name: str, value: Any) -> list[str]:
    """A string or a (nested) list of strings, flattened."""
    out: list[str] = []
    for item in value if isinstance(value, list | tuple) else [value]:
        if isinstance(item, list | tuple):
            out += _strings(name, item)
        elif isinstance(item, bytes):
            out.append(utf8(name, item))
        elif isinstance(item, str):
            out.append(_unicode(name, item))
        else:
            raise RequestError(f"{name} must be a string or a list of strings")
    return [s for s in out if s]


def _unicode(name: str, text: str) -> str:
    at = lone_surrogate(text)
    if at is not None:
        raise RequestError(f"{name} {not_unicode(text, at)}")
    return text


# request name -> (SamplingParams field, converter)
SAMPLING_INPUTS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "max_tokens": ("max_tokens", _int), "min_tokens": ("min_tokens", _int),
    "min_length": ("min_tokens", _int), "temperature": ("temperature", _float),
    "top_p": ("top_p", _float), "top_k": ("top_k", _int), "min_p": ("min_p", _float),
    "seed": ("seed", _int), "random_seed": ("seed", _int),
    "repetition_penalty": ("repetition_penalty", _float),
    "presence_penalty": ("presence_penalty", _float),
    "frequency_penalty": ("frequency_penalty", _float),
    "stop": ("stop", _strings), "stop_words": ("stop", _strings),
    "bad_words": ("bad_words", _strings), "ignore_eos": ("ignore_eos", _bool),
}
CONTROL_INPUTS = ("text_input", "stream", "exclude_input_in_output")
# The inputs and outputs as Triton tensors (name, datatype, shape), for model metadata
# and config.pbtxt. Aliases (random_seed, stop_words, min_length) are accepted as well.
INPUTS = [("text_input", "BYTES", [1]), ("max_tokens", "INT32", [1]),
          ("temperature", "FP32", [1]), ("top_p", "FP32", [1]), ("top_k", "INT32", [1]),
          ("min_p", "FP32", [1]), ("seed", "UINT64", [1]), ("stop", "BYTES", [-1]),
          ("bad_words", "BYTES", [-1]), ("presence_penalty", "FP32", [1]),
          ("frequency_penalty", "FP32", [1]), ("repetition_penalty", "FP32", [1]),
          ("min_tokens", "INT32", [1]), ("ignore_eos", "BOOL", [1]), ("stream", "BOOL", [1]),
          ("exclude_input_in_output", "BOOL", [1])]
OUTPUTS = [("text_output", "BYTES", [-1])]
_IGNORED = ("id", "model_name", "model_version")  # envelope fields some clients send


@dataclass
class GenerateInput:
    text: str
    params: SamplingParams
    stream: bool = False
    # Triton's LLM backends return the prompt before the generated text unless told not
    # to; kiln does the same for whole answers. Streamed pieces never repeat the prompt.
    exclude_input_in_output: bool = False


def parse_generate_request(body: Mapping[str, Any]) -> GenerateInput:
    """Read one generate request; raises RequestError naming the bad input."""
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    nested = body.get("parameters") or {}
    if not isinstance(nested, Mapping):
        raise RequestError("parameters must be an object")
    values = {k: v for k, v in body.items() if k != "parameters" and k not in _IGNORED}
    values.update(nested)
    if "text_input" not in values:
        raise RequestError("text_input is required")
    text = _scalar("text_input", values.pop("text_input"))
    if not isinstance(text, str):
        raise RequestError("text_input must be a string")
    _unicode("text_input", text)
    stream = _bool("stream", values.pop("stream", False))
    exclude = _bool("exclude_input_in_output", values.pop("exclude_input_in_output", False))
    fields: dict[str, Any] = {}
    for name, value in values.items():
        if name not in SAMPLING_INPUTS:
            known = ", ".join(sorted([*CONTROL_INPUTS, *SAMPLING_INPUTS]))
            raise RequestError(f"unknown input {name!r}; known inputs: {known}")
        if value is None:
            continue
        field, convert = SAMPLING_INPUTS[name]
        fields[field] = convert(name, value)
    seed = fields.get("seed")
    if seed is not None and not -(1 << 63) <= seed < 1 << 64:  # int64 or uint64
        raise RequestError("seed must fit in 64 bits")
    if seed is not None and seed >= 1 << 63:  # uint64: the same 64 bits as an int64
        fields["seed"] = seed - (1 << 64)
    return GenerateInput(text, SamplingParams(**fields), stream, exclude)
