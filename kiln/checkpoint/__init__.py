"""Checkpoint readers. `open_checkpoint(path)` picks the reader by what the path is."""

from __future__ import annotations

from pathlib import Path

from kiln.checkpoint.base import Checkpoint
from kiln.errors import CheckpointError

__all__ = ["Checkpoint", "open_checkpoint"]


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        from kiln.checkpoint.gguf import GGUFCheckpoint

        return GGUFCheckpoint(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            from kiln.checkpoint.gguf import GGUFCheckpoint

            return GGUFCheckpoint(ggufs[0])
        from kiln.checkpoint.hf import HFCheckpoint

        return HFCheckpoint(path)
    raise CheckpointError(
        f"{path} is neither a HuggingFace model folder nor a .gguf file")
