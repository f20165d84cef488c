"""The engine dir format: what a build writes and a runtime reads, nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kiln.config import BuildConfig, EngineConfig, ModelConfig
from kiln.errors import KilnError

# 2: FP8 engines hold MoE experts in e4m3 (format 1 kept them in the model dtype; other
# format-1 engines read the same).
FORMAT_VERSION = 2
ENGINE_JSON = "engine.json"


def is_engine_dir(path: Path) -> bool:
    return (path / ENGINE_JSON).is_file()


def write_engine_config(path: Path, engine: EngineConfig) -> None:
    data = {
        "format_version": FORMAT_VERSION,
        "model": engine.model.to_dict(),
        "build": engine.build.to_dict(),
        "source": engine.source,
        "tuning": engine.tuning,
    }
    (path / ENGINE_JSON).write_text(json.dumps(data, indent=2) + "\n")


def load_engine_config(path: str | Path) -> EngineConfig:
    path = Path(path)
    try:
        data = json.loads((path / ENGINE_JSON).read_text())
    except FileNotFoundError:
        raise KilnError(f"{path} is not a kiln engine dir (no {ENGINE_JSON}); "
                        "build one with `kiln build SOURCE -o DIR`") from None
    except json.JSONDecodeError as e:
        raise KilnError(f"{path / ENGINE_JSON} is corrupt: {e}; rebuild the engine") from None
    version = data.get("format_version")
    engine = None
    if version in (1, FORMAT_VERSION):
        engine = EngineConfig(
            model=ModelConfig.from_dict(data["model"]),
            build=BuildConfig.from_dict(data["build"]),
            source=data.get("source", {}),
            tuning=data.get("tuning", {}),
            format_version=version,
        )
    if engine is None or (version == 1 and engine.model.num_experts
                          and engine.build.quantization == "fp8"):
        raise KilnError(f"{path} has engine format {version}, this kiln reads format "
                        f"{FORMAT_VERSION}; rebuild the engine")
    return engine


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' means bfloat16 where CUDA is available, float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def rank_file(path: Path, rank: int) -> Path:
    return path / f"rank{rank}.safetensors"
