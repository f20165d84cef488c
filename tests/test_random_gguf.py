"""kiln.checkpoint.random_gguf (benchmarks/random_gguf.py's command line): a random-block
GGUF file of a preset's shape builds into a kept engine whose every decoder linear is in
the asked llama.cpp type, and it generates; bad names get one line."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason="gguf is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_random_gguf_builds_a_kept_engine(tmp_path):
    import random_gguf

    from kiln import LLM, SamplingParams
    from kiln.build import build, load_engine_config
    from kiln.config import BuildConfig

    path = tmp_path / "smol.gguf"
    random_gguf.main([str(path), "--config", "smollm2-135m", "--type", "Q4_0",
                      "--head", "tied"])
    engine = build(path, tmp_path / "engine", BuildConfig(quantization="gguf",
                                                          max_seq_len=64), progress=False)
    layers = load_engine_config(engine).build.quant_layers
    assert len(layers) == 30 * 4 + 1 and layers.pop("lm_head") == "int8_g32"  # Q8_0, tied
    assert set(layers.values()) == {"int4_g32_offset"}  # Q4_0: d (q - 8), offset -8 d
    out = LLM(engine).generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4


def test_random_gguf_says_what_is_wrong(tmp_path, capsys):
    import random_gguf

    for args, message in ((["--config", "nope"], "unknown config 'nope'; one of"),
                          (["--config", "phi-2"], "not a llama-architecture"),
                          (["--type", "Q9"], "unknown llama.cpp type")):
        with pytest.raises(SystemExit, match=message):
            random_gguf.main([str(tmp_path / "x.gguf"), *args])
