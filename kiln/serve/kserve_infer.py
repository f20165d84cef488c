"""The KServe v2 inference protocol's tensors for `/v2/models/{name}/infer`.

A request holds input tensors `{"name", "datatype", "shape", "data"}` named as the
generate extension's inputs (`text_input` BYTES [1], `max_tokens` INT32 [1], ...; see
`generate_params.INPUTS`), so one parser serves both. Tensor data comes as JSON, or
with the binary tensor data extension (what `tritonclient.http` sends by default) after
a JSON header of `Inference-Header-Content-Length` bytes, each input saying its
`binary_data_size`. The reply is the `text_output` BYTES [1] tensor, as JSON data or as
binary data when the request asks for it. Bad tensors raise RequestError (400).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.errors import RequestError
from kiln.serve.generate_params import INPUTS, OUTPUTS

_NUMPY = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
          "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
          "UINT64": np.uint64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
_INTS = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
_FLOATS = {"FP16", "FP32", "FP64"}
_KINDS = {"BYTES": {"BYTES"}, "BOOL": {"BOOL"}, "INT32": _INTS, "UINT64": _INTS,
          "FP32": _FLOATS | _INTS}  # a datatype in the model metadata -> what is accepted
_EXPECTED = {name: datatype for name, datatype, _ in INPUTS}
# Request parameters that belong to the protocol, not to the model.
_RESERVED = {"binary_data_output", "priority", "timeout", "sequence_id", "sequence_start",
             "sequence_end", "headers"}


@dataclass
class InferRequest:
    id: str | None
    values: dict[str, Any]  # input name -> its elements (flattened), for generate_params
    binary_output: bool


def read_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse an infer request body (JSON, or JSON header + binary tensor data)."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise RequestError("Inference-Header-Content-Length must be the length of the "
                               "JSON header within the body")
        header, binary = body[:int(header_length)], body[int(header_length):]
    else:
        header, binary = body, b""
    try:
        request = json.loads(header)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request is not valid JSON: {e}") from None
    if not isinstance(request, Mapping):
        raise RequestError("the request body must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("inputs must be a non-empty list of tensors")
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise RequestError("parameters must be an object")
    binary_output = _flag(parameters, "binary_data_output", False)
    outputs = request.get("outputs") or []
    if not isinstance(outputs, list):
        raise RequestError("outputs must be a list of tensors")
    for output in outputs:
        if not isinstance(output, Mapping) or output.get("name") not in _OUTPUT_NAMES:
            name = output.get("name") if isinstance(output, Mapping) else output
            raise RequestError(f"unknown output {name!r}; this model has "
                               f"{', '.join(sorted(_OUTPUT_NAMES))}")
        binary_output = _flag(_parameters(f"output {output['name']!r}", output),
                              "binary_data", binary_output)
    values = {k: v for k, v in parameters.items() if k not in _RESERVED}
    offset = 0
    for tensor in inputs:
        name, data, offset = _read_tensor(tensor, binary, offset)
        if name in values and name not in parameters:
            raise RequestError(f"input {name!r} is given twice")
        values[name] = data
    if offset != len(binary):
        raise RequestError(f"{len(binary) - offset} bytes of binary data belong to no input")
    request_id = request.get("id")
    return InferRequest(str(request_id) if request_id is not None else None, values,
                        binary_output)


_OUTPUT_NAMES = {name for name, _, _ in OUTPUTS}


def _parameters(what: str, tensor: Mapping[str, Any]) -> Mapping[str, Any]:
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise RequestError(f"{what}: parameters must be an object")
    return parameters


def _flag(parameters: Mapping[str, Any], name: str, default: bool) -> bool:
    value = parameters.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):  # bool("false") is True: refuse, never guess
        raise RequestError(f"{name} must be true or false, got {value!r}")
    return value


def _read_tensor(tensor: Any, binary: bytes, offset: int) -> tuple[str, list[Any], int]:
    if not isinstance(tensor, Mapping) or not isinstance(tensor.get("name"), str):
        raise RequestError("each input must be an object with a name, datatype, shape "
                           "and data")
    name = tensor["name"]
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    expected = _EXPECTED.get(name)
    if expected is None:
        raise RequestError(f"unknown input {name!r}; inputs: {', '.join(sorted(_EXPECTED))}")
    if not isinstance(datatype, str) or datatype not in _KINDS[expected]:
        raise RequestError(f"input {name!r} must be {expected}, got datatype {datatype!r}")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(f"input {name!r}: shape must be a list of sizes, got {shape!r}")
    count = math.prod(shape)
    size = _parameters(f"input {name!r}", tensor).get("binary_data_size")
    if size is not None:
        if (not isinstance(size, int) or isinstance(size, bool) or size < 0
                or offset + size > len(binary)):
            raise RequestError(f"input {name!r}: binary_data_size {size!r} is past the end "
                               "of the body")
        data = _from_binary(name, datatype, binary[offset:offset + size])
        offset += size
    else:
        if "data" not in tensor:
            raise RequestError(f"input {name!r} has no data")
        data = _flatten(tensor["data"])
        data = [_check_json_element(name, datatype, x) for x in data]
    if len(data) != count:
        raise RequestError(f"input {name!r}: shape {shape} holds {count} elements, the data "
                           f"has {len(data)}")
    return name, data, offset


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    return [x for item in data for x in _flatten(item)]


def _check_json_element(name: str, datatype: str, x: Any) -> Any:
    ok = (isinstance(x, str) if datatype == "BYTES" else isinstance(x, bool)
          if datatype == "BOOL" else not isinstance(x, bool) and isinstance(x, int)
          if datatype in _INTS else not isinstance(x, bool) and isinstance(x, int | float))
    if not ok:
        raise RequestError(f"input {name!r}: {x!r} is not a {datatype} element")
    return x


def _from_binary(name: str, datatype: str, raw: bytes) -> list[Any]:
    if datatype != "BYTES":
        dtype = np.dtype(_NUMPY[datatype]).newbyteorder("<")
        if len(raw) % dtype.itemsize:
            raise RequestError(f"input {name!r}: {len(raw)} bytes are not a whole number of "
                               f"{datatype} elements")
        return np.frombuffer(raw, dtype=dtype).tolist()
    items, at = [], 0
    while at < len(raw):  # each element: a 4-byte little-endian length, then the bytes
        if at + 4 > len(raw):
            raise RequestError(f"input {name!r}: truncated BYTES element")
        (length,) = struct.unpack_from("<I", raw, at)
        if at + 4 + length > len(raw):
            raise RequestError(f"input {name!r}: truncated BYTES element")
        try:
            items.append(raw[at + 4:at + 4 + length].decode())
        except UnicodeDecodeError:
            raise RequestError(f"input {name!r} must be UTF-8 text") from None
        at += 4 + length
    return items


def infer_response(model: str, version: str, request_id: str | None, text: str,
                   finish_reason: str | None, binary: bool) -> tuple[bytes, dict[str, str]]:
    """The reply body and its headers: `text_output` BYTES [1], JSON or binary data."""
    output: dict[str, Any] = {"name": "text_output", "datatype": "BYTES", "shape": [1]}
    raw = text.encode()
    if binary:
        output["parameters"] = {"binary_data_size": 4 + len(raw)}
    else:
        output["data"] = [text]
    reply: dict[str, Any] = {"model_name": model, "model_version": version,
                             "outputs": [output], "parameters": {"finish_reason": finish_reason}}
    if request_id is not None:
        reply["id"] = request_id
    header = json.dumps(reply).encode()
    if not binary:
        return header, {"content-type": "application/json"}
    return header + struct.pack("<I", len(raw)) + raw, {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header))}
