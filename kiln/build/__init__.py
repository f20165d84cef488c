"""Build: checkpoint -> engine dir (engine.json, rank{r}.safetensors, tokenizer/)."""

from kiln.build.builder import build
from kiln.build.engine_dir import load_engine_config

__all__ = ["build", "load_engine_config"]
