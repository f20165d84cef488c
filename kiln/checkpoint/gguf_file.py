"""The GGUF container read directly: metadata into Python values, tensors as views of the
memory-mapped file.

Written for kiln's reads (GGUFCheckpoint, the tokenizer writer): the gguf package's
reader makes a numpy view per metadata element, which for a 49k-token vocabulary and its
merges takes ~2 s, most of a cold `kiln run`; this walks the same layout with `struct`
in ~0.1 s. Layout (GGUF v2/v3, little endian): magic, version u32, tensor count u64, key
count u64; each key: string, value type u32, value (an array: element type u32, count u64,
elements); each tensor: name, dims u32, dims x u64 (innermost first), ggml type u32, offset
u64 from the data section, which starts at the next multiple of general.alignment (32).
Strings are a u64 length and UTF-8 bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

# gguf.GGUFValueType -> struct format of a scalar (after the byte order)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
            10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# ggml types whose data are plain numpy values (the rest are read as bytes of blocks)
_PLAIN = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
          gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
          gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
          gguf.GGMLQuantizationType.I64: np.int64}


class UnknownTypeError(ValueError):
    """A tensor's ggml type is a number the gguf package has no name for."""


@dataclass(frozen=True)
class GGUFField:
    value: Any

    def contents(self) -> Any:
        """The value as Python: str, int, float, bool, or a list of them."""
        return self.value


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost first
    tensor_type: gguf.GGMLQuantizationType
    data_offset: int  # in the file
    n_bytes: int
    _file: np.ndarray
    _order: str = "<"  # the file's byte order

    @property
    def data(self) -> np.ndarray:
        """Plain types as their values, outermost dim first; block types as the bytes of
        each row's blocks (what gguf.quants.dequantize takes)."""
        raw = self._file[self.data_offset:self.data_offset + self.n_bytes]
        dims = tuple(reversed(self.shape))
        plain = _PLAIN.get(self.tensor_type)
        if plain is not None:
            return raw.view(np.dtype(plain).newbyteorder(self._order)).reshape(dims)
        return raw.reshape(gguf.quants.quant_shape_to_byte_shape(dims, self.tensor_type))


class GGUFFile:
    """fields: key -> GGUFField; tensors: GGUFTensor list; data: the whole file (read-only
    memory map); byte_order "<" or ">" (a big-endian file's metadata reads as such; its
    tensor data is left as stored). Raises ValueError (or UnicodeDecodeError) for a file
    that is cut short, malformed or not GGUF."""

    def __init__(self, path: str | Path) -> None:
        self.data = np.memmap(path, mode="r").view(np.ndarray)
        buf = memoryview(self.data)
        self._buf, self._pos = buf, 0
        self.byte_order = self._order = "<"
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("not a GGUF file")
        self._pos = 4
        version = self._unpack("I")
        if version & 0xFFFF == 0 and version:  # written big endian (as llama.cpp can)
            self.byte_order = self._order = ">"
            self._pos = 4
            version = self._unpack("I")
        n_tensors, n_kv = self._unpack("Q"), self._unpack("Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (kiln reads 2 and 3)")
        self.fields: dict[str, GGUFField] = {}
        for _ in range(n_kv):
            key = self._string()
            if key in self.fields:
                raise ValueError(f"metadata key {key!r} appears twice")
            self.fields[key] = GGUFField(self._value(self._unpack("I")))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._unpack("Q") for _ in range(self._unpack("I")))
            number = self._unpack("I")
            try:
                qtype = gguf.GGMLQuantizationType(number)
            except ValueError:  # a type newer than the gguf package (or a broken header)
                raise UnknownTypeError(f"tensor {name} has type {number}") from None
            infos.append((name, dims, qtype, self._unpack("Q")))
        alignment = self.fields.get("general.alignment", GGUFField(32)).value
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
                or alignment & (alignment - 1):
            raise ValueError(f"general.alignment is {alignment!r}, not a power of two")
        start = -(-self._pos // alignment) * alignment
        if len({info[0] for info in infos}) != len(infos):
            raise ValueError("a tensor name appears twice")
        self.tensors = []
        for name, dims, qtype, offset in infos:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            count = math.prod(dims)
            if not all(dims):
                raise ValueError(f"tensor {name} ({qtype.name}) has shape {list(dims)}: no "
                                 "values; the converter that wrote it is broken")
            if dims and dims[0] % block:  # ggml blocks never span rows
                raise ValueError(f"tensor {name} has rows of {dims[0]} values, not whole "
                                 f"{qtype.name} blocks of {block}; the converter that wrote "
                                 "it is broken")
            if count % block:
                raise ValueError(f"tensor {name} has {count} values, not whole blocks of "
                                 f"{block} ({qtype.name})")
            self.tensors.append(GGUFTensor(name, dims, qtype, start + offset,
                                           count // block * size, self.data, self._order))

    def _unpack(self, fmt: str) -> Any:
        fmt = self._order + fmt
        size = struct.calcsize(fmt)
        if self._pos + size > len(self._buf):
            raise ValueError(f"the file ends at byte {len(self._buf)}, inside its header")
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += size
        return value

    def _string(self) -> str:
        n = self._unpack("Q")
        if self._pos + n > len(self._buf):
            raise ValueError(f"the file ends at byte {len(self._buf)}, inside its header")
        text = str(self._buf[self._pos:self._pos + n], "utf-8")
        self._pos += n
        return text

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        element, count = self._unpack("I"), self._unpack("Q")
        if element in _SCALARS:  # numbers at once
            dtype = np.dtype(self._order + _SCALARS[element])
            end = self._pos + count * dtype.itemsize
            if end > len(self._buf):
                raise ValueError(f"the file ends at byte {len(self._buf)}, inside its header")
            values = np.frombuffer(self._buf, dtype, count, self._pos).tolist()
            self._pos = end
            return values
        return [self._value(element) for _ in range(count)]
