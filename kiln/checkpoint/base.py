"""The checkpoint interface: a ModelConfig plus a lazy stream of HF-named tensors."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from pathlib import Path

import torch

from kiln.config import ModelConfig


class Checkpoint(abc.ABC):
    """A readable source model.

    Readers validate what they can when constructed (files present, config readable),
    so a bad source fails before any conversion starts. Tensor names use the
    HuggingFace Llama naming (`model.layers.0.self_attn.q_proj.weight`), whatever the
    file format, so builders need one name table.
    """

    source: Path
    config: ModelConfig
    hf_config: dict = {}  # the raw config.json of HF folders (quantization_config)
    # A tokenizer made up for the source (random weights): calibration reads the text's
    # bytes as ids instead of its ids.
    synthetic_tokenizer = False
    # Values made up by kiln itself (random weights): the build skips its check of them.
    synthetic_values = False

    @abc.abstractmethod
    def num_tensors(self) -> int:
        """How many tensors `tensors()` yields (for progress bars)."""

    @abc.abstractmethod
    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(hf_name, tensor)` one at a time, in the checkpoint's own dtype."""

    @abc.abstractmethod
    def write_tokenizer(self, dest: Path) -> bool:
        """Write tokenizer.json, tokenizer_config.json (with chat_template) into dest.

        Returns False when the source carries no tokenizer (the engine then takes
        token ids only).
        """

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A cheap identity of the source files (size + mtime based), for caching."""
