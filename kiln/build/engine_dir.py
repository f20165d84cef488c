"""The engine dir format: what a build writes and a runtime reads, nothing else."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from kiln.config import (
    ACTIVATIONS,
    DTYPES,
    KV_CACHE_DTYPES,
    LIMITS,
    QUANTIZATIONS,
    BuildConfig,
    EngineConfig,
    ModelConfig,
)
from kiln.errors import KilnError

NORM_TYPES = ("rmsnorm", "layernorm")  # kiln.layers.norm.make_norm
POSITION_EMBEDDINGS = ("rope", "learned", "alibi")  # kiln.models.decoder
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
    version = data.get("format_version") if isinstance(data, dict) else None
    engine = None
    if version in (1, FORMAT_VERSION):
        try:
            engine = EngineConfig(
                model=ModelConfig.from_dict(data["model"]),
                build=BuildConfig.from_dict(data["build"]),
                source=data.get("source", {}),
                tuning=data.get("tuning", {}),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _damaged(path, f"{type(e).__name__}: {e}") from None
    if engine is None or (version == 1 and engine.model.num_experts
                          and engine.build.quantization == "fp8"):
        raise KilnError(f"{path} has engine format {version}, this kiln reads format "
                        f"{FORMAT_VERSION}; rebuild the engine")
    problems = _problems(engine)
    if problems:
        raise _damaged(path, "; ".join(problems[:3]))
    _check_rank_files(path, engine)
    return engine


def _damaged(path: Path, what: str) -> KilnError:
    return KilnError(f"{path / ENGINE_JSON} is damaged or was edited ({what}); rebuild the "
                     "engine with `kiln build SOURCE -o DIR`")


def _problems(engine: EngineConfig) -> list[str]:
    """What engine.json holds that no build writes: values of the wrong type, sizes
    below 1, names kiln does not know, rank files that are not there."""
    found = []
    for part in ("model", "build"):
        obj = getattr(engine, part)
        for f in dataclasses.fields(obj):
            value, kind = getattr(obj, f.name), f.type
            wrong = (kind == "int" and (isinstance(value, bool) or not isinstance(value, int))
                     or kind == "float" and (isinstance(value, bool)
                                            or not isinstance(value, (int, float)))
                     or kind in ("str", "bool") and type(value).__name__ != kind)
            if wrong:
                found.append(f"{part}.{f.name} is {value!r}")
    if found:
        return found
    m, b = engine.model, engine.build
    for part, obj, names in (("model", m, ("vocab_size", "hidden_size", "num_layers",
                                           "num_heads", "num_kv_heads", "head_dim")),
                             ("build", b, (*LIMITS, "block_size", "tp_size", "pp_size"))):
        found += [f"{part}.{n} is {getattr(obj, n)}" for n in names if getattr(obj, n) < 1]
    for name, allowed in (("dtype", DTYPES), ("quantization", QUANTIZATIONS),
                          ("kv_cache_dtype", (*KV_CACHE_DTYPES, *DTYPES, "float8_e4m3fn",
                                              "int8"))):
        if getattr(b, name) not in allowed:
            found.append(f"build.{name} is {getattr(b, name)!r}")
    # The model's layer kinds: the build checks the activation (kiln.build.builder.validate,
    # the same list); the norms and positions it writes come from the architecture.
    for name, allowed in (("hidden_act", ACTIVATIONS), ("norm_type", NORM_TYPES),
                          ("position_embedding", POSITION_EMBEDDINGS)):
        if getattr(m, name) not in allowed:
            found.append(f"model.{name} is {getattr(m, name)!r} (kiln knows "
                         f"{', '.join(allowed)})")
    return found


def _check_rank_files(path: Path, engine: EngineConfig) -> None:
    """Every rank's weights are there (engines built with stored weights)."""
    if engine.build.load_format != "stored":
        return
    missing = [rank_file(path, r).name for r in range(engine.build.tp_size *
                                                      engine.build.pp_size)
               if not rank_file(path, r).is_file()]
    if missing:
        raise KilnError(f"{path} lacks {', '.join(missing[:3])}: the engine dir is "
                        "incomplete; rebuild the engine with `kiln build SOURCE -o DIR`")


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' means bfloat16 where CUDA is available, float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def rank_file(path: Path, rank: int) -> Path:
    return path / f"rank{rank}.safetensors"
