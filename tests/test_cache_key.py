"""The engine cache's key (kiln run / LLM(SOURCE) build once): a calibration file counts by
its contents, so editing the text builds a new engine instead of reusing stale scales."""

from __future__ import annotations

from kiln.config import BuildConfig
from kiln.resolve import resolve_engine
from tests.conftest import make_hf_model

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def test_calibration_text_is_part_of_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    make_hf_model("llama", tmp_path / "hf")
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    cfg = BuildConfig(dtype="float32", max_seq_len=64, kv_cache_dtype="int8",
                      calib_file=str(calib), calib_samples=2, calib_seq_len=32)
    first = resolve_engine(tmp_path / "hf", cfg, progress=False)
    scales = (first / "rank0.safetensors").read_bytes()
    assert resolve_engine(tmp_path / "hf", cfg, progress=False) == first
    calib.write_text(TEXT.upper() + " 12345 " * 30)
    second = resolve_engine(tmp_path / "hf", cfg, progress=False)
    assert second != first
    assert (second / "rank0.safetensors").read_bytes() != scales
    calib.write_text(TEXT)  # the first text again: its engine, still in the cache
    assert resolve_engine(tmp_path / "hf", cfg, progress=False) == first
