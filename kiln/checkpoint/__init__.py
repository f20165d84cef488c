"""Checkpoint readers. `open_checkpoint(path)` picks the reader by what the path is."""

from __future__ import annotations

from pathlib import Path

from kiln.checkpoint.base import Checkpoint
from kiln.errors import CheckpointError

__all__ = ["Checkpoint", "open_checkpoint", "source_fingerprint"]


def _gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` names: itself, or the one .gguf of a folder without config.json
    (the extension in any case: .GGUF too)."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(ggufs) == 1:
            return ggufs[0]
    return None


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
    if path.is_dir():
        from kiln.checkpoint.hf import HFCheckpoint

        return HFCheckpoint(path)
    raise CheckpointError(
        f"{path} is neither a HuggingFace model folder nor a .gguf file")
