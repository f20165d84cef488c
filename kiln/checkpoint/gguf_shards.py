"""Split GGUFs: llama.cpp's gguf-split writes NAME-00001-of-00003.gguf ... -00003-of-00003,
each with split.no (0-based), split.count and, in the first, split.tensors.count; the
first shard holds the metadata, every shard some of the tensors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kiln.checkpoint.gguf_file import GGUFFile
from kiln.errors import CheckpointError

_SHARD_NAME = re.compile(r"(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})(?P<ext>\.gguf)",
                         re.IGNORECASE)


def _value(reader: GGUFFile, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def shard_paths(path: Path, count: int | None = None) -> list[Path] | None:
    """The paths of all shards of the split GGUF `path` is one of, by llama.cpp's naming
    (count: how many, else the name's); None if the name is not a shard's."""
    m = _SHARD_NAME.fullmatch(path.name)
    if m is None:
        return None
    count = count or int(m["count"])
    return [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}{m['ext']}")
            for i in range(1, count + 1)]


def merge_hint(path: Path) -> str:
    return f"or merge the shards into one file: llama-gguf-split --merge {path.name} merged.gguf"


def open_shards(path: Path, first: GGUFFile) -> list[GGUFFile]:
    """[first] for a whole GGUF; for the first shard of a split one, every shard (checked:
    numbered in order, all present, the tensors all there). Any other shard, or a shard
    whose siblings cannot be found, is a CheckpointError saying what to do."""
    count, no = _value(first, "split.count"), _value(first, "split.no")
    if not isinstance(count, int) or count <= 1:
        return [first]
    name = path.name
    paths = shard_paths(path, count)
    if not isinstance(no, int) or no != 0:
        first_name = f" ({paths[0].name})" if paths else ""
        raise CheckpointError(f"{name} is shard {no + 1 if isinstance(no, int) else '?'} of "
                              f"{count} of a split GGUF: name its first shard{first_name}, "
                              + merge_hint(paths[0] if paths else path))
    if paths is None:
        raise CheckpointError(
            f"{name} is shard 1 of {count} of a split GGUF, but its name is not llama.cpp's "
            f"NAME-00001-of-{count:05d}.gguf, so kiln cannot find the other shards: name them "
            "so, " + merge_hint(path))
    readers = [first]
    for i, shard in enumerate(paths[1:], 1):
        if not shard.is_file():
            raise CheckpointError(f"{name} is shard 1 of {count} of a split GGUF, but shard "
                                  f"{i + 1}, {shard.name}, is not beside it: put every shard "
                                  "in one folder, " + merge_hint(path))
        try:
            reader = GGUFFile(shard)
        except (ValueError, IndexError, KeyError, TypeError, OverflowError,
                UnicodeDecodeError) as e:
            raise CheckpointError(f"{shard.name} is truncated or corrupt: {e}") from None
        if (_value(reader, "split.no"), _value(reader, "split.count")) != (i, count):
            raise CheckpointError(
                f"{shard.name} is not shard {i + 1} of {count} of {name}'s split GGUF (its "
                f"split.no / split.count say {_value(reader, 'split.no')} / "
                f"{_value(reader, 'split.count')}); the shards are from different splits")
        readers.append(reader)
    names = [t.name for r in readers for t in r.tensors]
    if len(set(names)) != len(names):
        raise CheckpointError(f"the shards of {name} hold a tensor twice; they are from "
                              "different splits")
    want = _value(first, "split.tensors.count")
    if isinstance(want, int) and want != len(names):
        raise CheckpointError(f"the {count} shards of {name} hold {len(names)} tensors, but "
                              f"split.tensors.count says {want}; a shard is from another split")
    return readers
