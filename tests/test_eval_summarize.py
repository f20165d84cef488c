"""`kiln eval summarize | quality | perplexity`: ROUGE against references and transformers,
the threshold gate, one table across build formats, and clear errors for bad files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kiln.cli import main
from tests.conftest import smollm2_gguf
from tests.test_smollm2 import botchan_text


def tiny_model_with_tokenizer(folder: Path) -> Path:
    """A tiny random Llama with a byte-level tokenizer (256 bytes + <s> + </s>)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                         eos_token="</s>").save_pretrained(folder)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(vocab) + 2, max_position_embeddings=512,
        initializer_range=0.2, rms_norm_eps=1e-6, bos_token_id=256, eos_token_id=257,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32) \
        .save_pretrained(folder)
    return folder


def write_passages(path: Path, count: int, chars: int = 500) -> Path:
    """Chunks of botchan.txt (public domain); the first two sentences stand in for the
    reference summary."""
    body = " ".join(botchan_text()[4000:].split())
    sentences = re.split(r"(?<=[.!?])\s+", body)[1:]
    lines, i = [], 0
    for _ in range(count):
        chunk: list[str] = []
        while len(" ".join(chunk)) < chars:
            chunk.append(sentences[i])
            i += 1
        lines.append(json.dumps({"article": " ".join(chunk), "summary": " ".join(chunk[:2])}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def passages(tmp_path_factory) -> Path:
    return write_passages(tmp_path_factory.mktemp("eval_data") / "passages.jsonl", 2)


@pytest.fixture(scope="module")
def summarize_run(smollm2_engine, passages, tmp_path_factory):
    """One `kiln eval summarize --compare-hf` run on SmolLM2 (float32), gated at 1 (the
    most a ROUGE score can be: above it is refused)."""
    pytest.importorskip("rouge_score")
    out = tmp_path_factory.mktemp("eval_out") / "summary.json"
    code = main(["eval", "summarize", str(smollm2_engine), "--data", str(passages),
                 "--max-samples", "2", "--max-tokens", "12", "--compare-hf", str(smollm2_gguf()),
                 "--rouge-threshold", "1", "--device", "cpu", "--out", str(out)])
    return code, json.loads(out.read_text())


def test_summarize_kiln_equals_transformers_in_float32(summarize_run):
    _, report = summarize_run
    assert report["num_samples"] == 2 and report["prompt"] == "chat template"
    for sample in report["samples"]:
        assert sample["kiln"] and sample["kiln"] == sample["transformers"]
    assert report["rouge"]["kiln_vs_transformers"] == {k: 1.0 for k in
                                                       ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    ours, theirs = (report["rouge"][k] for k in ("kiln_vs_reference",
                                                  "transformers_vs_reference"))
    assert ours == theirs and 0 < ours["rougeL"] < 1


def test_summarize_threshold_gates(summarize_run):
    code, report = summarize_run
    assert code == 2  # ROUGE-L is below 1 here; the JSON report is written all the same
    assert report["gate"] == {"score": "kiln_vs_reference.rougeL", "threshold": 1.0,
                              "value": report["rouge"]["kiln_vs_reference"]["rougeL"],
                              "passed": False}


def test_summarize_threshold_passes(smollm2_engine, passages, capsys):
    pytest.importorskip("rouge_score")
    code = main(["eval", "summarize", str(smollm2_engine), "--data", str(passages),
                 "--max-samples", "1", "--max-tokens", "4", "--rouge-threshold", "0",
                 "--device", "cpu"])
    assert code == 0
    assert "kiln vs reference" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ('{"article": "a"}\nnot json\n', ":2: not a JSON object"),
    ('{"summary": "only a summary"}\n', ":1: no article"),
    ("\n", "holds no samples"),
])
def test_bad_data_file_is_one_clear_line(tmp_path, capsys, content, message):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    code = main(["eval", "summarize", "unused-model", "--data", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("kiln: error: ") and message in err and err.count("\n") == 1


def test_perplexity_takes_build_options(tiny_source, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text(botchan_text()[6000:7000])
    values = []
    for options in ([], ["--kv-cache-dtype", "fp8"]):
        code = main(["eval", "perplexity", str(tiny_source), "--file", str(text), "--dtype",
                     "float32", "--max-seq-len", "512", "--window", "256", "--device", "cpu",
                     *options])
        out = capsys.readouterr().out
        assert code == 0
        values.append(float(re.search(r"perplexity ([0-9.]+)", out).group(1)))
    kv_dtypes = sorted(json.loads(p.read_text())["build"]["kv_cache_dtype"]
                       for p in (tmp_path / "cache").rglob("engine.json"))
    assert len(kv_dtypes) == 2 and "fp8" in kv_dtypes  # two engines: float and fp8 KV
    assert values[0] != values[1] and values[1] == pytest.approx(values[0], rel=0.05)


@pytest.mark.parametrize("options, message", [
    (["--window", "0"], "--window must be at least 2 (tokens scored together), got 0"),
    (["--window", "-4"], "--window must be at least 2 (tokens scored together), got -4"),
    (["--window", "1"], "--window must be at least 2 (tokens scored together), got 1"),
    (["--max-tokens", "0"], "--max-tokens must be at least 2 (a token and the one after it), "
     "got 0"),
])
def test_perplexity_options_too_small_are_one_line(options, message, tmp_path, capsys):
    """--window 0 was a ValueError traceback, -4 and 1 ZeroDivisionErrors, --max-tokens 0
    "the text holds fewer than 2 tokens": now what is wrong, before the model loads."""
    text = tmp_path / "text.txt"
    text.write_text("some text to score")
    code = main(["eval", "perplexity", str(tmp_path / "no-model"), "--file", str(text),
                 *options])
    err = capsys.readouterr().err
    assert code == 2 and err == f"kiln: error: {message}\n"


@pytest.mark.parametrize("mode, options, message", [
    ("quality", ["--max-ppl-tokens", "1"], "--max-ppl-tokens must be at least 2"),
    ("quality", ["--out", "{tmp}/afile.txt/q.json"], "afile.txt is a file, not a directory"),
    ("summarize", ["--out", "{tmp}/afile.txt/s.json"], "afile.txt is a file, not a directory"),
])
def test_eval_options_are_checked_before_the_model_loads(mode, options, message, tmp_path,
                                                         capsys):
    """An --out under a regular file failed with a traceback after the whole evaluation."""
    (tmp_path / "afile.txt").write_text("")
    text = tmp_path / "text.txt"
    text.write_text("some text to score")
    data = write_passages(tmp_path / "data.jsonl", 1, chars=100)
    files = ["--file", str(text)] if mode == "quality" else []
    code = main(["eval", mode, str(tmp_path / "no-model"), *files, "--data", str(data),
                 *[o.format(tmp=tmp_path) for o in options]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kiln: error: ") and message in err, err


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    return tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny_tok") / "model")


def test_quality_table_across_formats(tiny_source, tmp_path, monkeypatch, capsys):
    pytest.importorskip("rouge_score")
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text(botchan_text()[6000:9000])
    data = write_passages(tmp_path / "data.jsonl", 2, chars=200)
    out = tmp_path / "quality.json"
    code = main(["eval", "quality", str(tiny_source), "--file", str(text), "--data", str(data),
                 "--formats", "float32,int8-kv", "--max-tokens", "8", "--window", "256",
                 "--max-seq-len", "512", "--calib-samples", "2", "--calib-seq-len", "128",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    rows = {r["format"]: r for r in report["formats"]}
    assert list(rows) == ["float32", "int8-kv"]
    assert report["calibration"] == "second half of --file"
    assert rows["float32"]["perplexity_delta"] == 0 and rows["float32"]["rougeL_vs_float"] == 1
    assert rows["int8-kv"]["kv_cache_dtype"] == "int8"
    assert abs(rows["int8-kv"]["perplexity_delta_pct"]) < 5
    assert 0 <= rows["int8-kv"]["rougeL_vs_float"] <= 1
    assert "ROUGE-L vs float" in capsys.readouterr().out
    assert out.with_suffix(".png").exists()


def test_quality_rejects_unknown_format(tiny_source, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    code = main(["eval", "quality", str(tiny_source), "--file", str(text), "--data",
                 str(text), "--formats", "float32,int4"])
    assert code == 2 and "unknown format 'int4'" in capsys.readouterr().err
