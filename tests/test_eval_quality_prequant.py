"""`kiln eval quality` on a checkpoint already quantized (static FP8, compressed-tensors):
its weights and input scales are kept, so the fp8 format with --activation-scheme static is
not calibrated again (the build refuses a --calib-file that changes nothing)."""

from __future__ import annotations

import json
import shutil

import pytest

from kiln.cli import main
from kiln.eval.quality import prequantized_source
from tests.test_eval_summarize import tiny_model_with_tokenizer, write_passages
from tests.test_smollm2 import botchan_text


def test_prequantized_source(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    assert not prequantized_source(str(folder)) and not prequantized_source(None)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not prequantized_source(str(folder))
    (folder / "config.json").write_text(json.dumps({"quantization_config": {}}))
    assert prequantized_source(str(folder))
    (folder / "config.json").write_text("{")
    assert not prequantized_source(str(folder))
    (folder / "hf_quant_config.json").write_text("{}")
    assert prequantized_source(str(folder))


def test_quality_on_a_static_fp8_checkpoint(tmp_path, monkeypatch, capsys):
    pytest.importorskip("rouge_score")
    pytest.importorskip("llmcompressor")
    from tests.quant_checkpoints import compressed_tensors_fp8

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    src = tiny_model_with_tokenizer(tmp_path / "float")
    fp8 = compressed_tensors_fp8(src, tmp_path / "fp8", scheme="FP8")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file() and not (fp8 / name).is_file():
            shutil.copy(src / name, fp8 / name)
    text = tmp_path / "text.txt"
    text.write_text(botchan_text()[6000:8000])
    data = write_passages(tmp_path / "data.jsonl", 1, chars=150)
    out = tmp_path / "quality.json"
    code = main(["eval", "quality", str(fp8), "--file", str(text), "--data", str(data),
                 "--formats", "float32,fp8", "--activation-scheme", "static",
                 "--max-tokens", "4", "--window", "128", "--max-seq-len", "256",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = {r["format"]: r for r in json.loads(out.read_text())["formats"]}
    assert rows["fp8"]["quantization"] == "fp8"
