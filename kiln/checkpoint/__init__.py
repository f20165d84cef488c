"""Checkpoint readers. `open_checkpoint(path)` picks the reader by what the path is."""

from __future__ import annotations

from pathlib import Path

from kiln.checkpoint.base import Checkpoint
from kiln.errors import CheckpointError

__all__ = ["Checkpoint", "open_checkpoint", "source_fingerprint"]


def _gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` names: itself, or, in a folder without config.json, its one
    .gguf, or the first shard of its one split GGUF (every .gguf a shard of it, by
    gguf-split's naming; the extension in any case: .GGUF too)."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    ggufs = _folder_ggufs(path)
    if len(ggufs) == 1:
        return ggufs[0]
    return _one_split(ggufs)


def _folder_ggufs(path: Path) -> list[Path]:
    if not path.is_dir() or (path / "config.json").exists():
        return []
    return sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())


def _one_split(ggufs: list[Path]) -> Path | None:
    """The first shard where ggufs are the shards of one split GGUF (the lowest-numbered
    one there where the first is missing: its reader says which to name), else None."""
    from kiln.checkpoint.gguf_shards import shard_paths

    sets = {tuple(shard_paths(p) or [p]) for p in ggufs}
    if len(ggufs) < 2 or len(sets) != 1:
        return None
    shards = sets.pop()
    return shards[0] if shards[0] in ggufs else ggufs[0]


def source_fingerprint(path: str | Path) -> str | None:
    """What open_checkpoint(path).fingerprint() gives, without reading the checkpoint, where
    that is cheap (a GGUF file: its name, size and mtime); None elsewhere."""
    gguf_file = _gguf_file(Path(path).expanduser())
    if gguf_file is None:
        return None
    from kiln.checkpoint.gguf import gguf_fingerprint

    return gguf_fingerprint(gguf_file)


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    gguf_file = _gguf_file(path)
    if gguf_file is not None:
        from kiln.checkpoint.gguf import GGUFCheckpoint

        return GGUFCheckpoint(gguf_file)
    ggufs = _folder_ggufs(path)
    if len(ggufs) > 1:  # and not one split's shards (_gguf_file took those)
        names = ", ".join(p.name for p in ggufs[:4]) + (" ..." if len(ggufs) > 4 else "")
        raise CheckpointError(f"{path} holds {len(ggufs)} .gguf files ({names}) that are not "
                              "the shards of one split GGUF; name the one to use")
    if path.is_dir():
        from kiln.checkpoint.hf import HFCheckpoint

        return HFCheckpoint(path)
    if path.is_file() and (path.parent / "config.json").is_file():
        raise CheckpointError(f"{path} is a file of a HuggingFace model folder; pass the "
                              f"folder that holds it: {path.parent}")
    raise CheckpointError(
        f"{path} is neither a HuggingFace model folder nor a .gguf file")
