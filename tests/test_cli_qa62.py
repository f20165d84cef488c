"""What a QA pass of the command line found (62nd session): `kiln chat` losing the
conversation to a message too long to send, `kiln bench --random-config` benching an engine
cached with other build options, `kiln eval summarize --compare-hf` naming something that is
not the model's source, a tiny vocabulary in `kiln bench`, and `kiln eval` on an engine
without a tokenizer."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kiln.cli import main
from tests.conftest import make_hf_model
from tests.test_serve_support import tiny_chat_engine


# ---- 1. kiln chat: a message too long for the context -------------------------------------
def test_a_refused_message_keeps_the_conversation(monkeypatch, capsys):
    """A message longer than the context was refused, and the turns before it were gone
    too (_fit had dropped them trying to make room); now the chat goes on with them."""
    import kiln.chat as chat

    prompts: list[list[int]] = []
    answer = chat._answer
    monkeypatch.setattr(chat, "_answer", lambda engine, prompt, params: (
        prompts.append(prompt), answer(engine, prompt, params))[1])
    monkeypatch.setattr(sys, "stdin", io.StringIO(
        "hello there\n" + "word " * 400 + "\nsecond\n"))
    assert main(["chat", str(tiny_chat_engine()), "--device", "cpu", "--max-tokens", "3",
                 "--temperature", "0", "--max-seq-len", "200"]) == 0
    out = capsys.readouterr().out
    assert "(that message alone is longer than the model's context)" in out
    assert len(prompts) == 2
    assert prompts[1][:len(prompts[0])] == prompts[0]  # the first turn is still there


# ---- 2. kiln bench --random-config: one cached engine per build --------------------------
def _bench_args(*flags: str) -> argparse.Namespace:
    from kiln.bench.offline_args import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p, latency=True)
    return p.parse_args(["--random-config", "smollm2-135m", "--input-len", "8",
                         "--output-len", "2", "--device", "cpu", *flags])


def test_random_config_engines_differ_in_every_weight_option(tmp_path, monkeypatch):
    """The cached engine's name left out the activation scheme, the calibration text and
    SmoothQuant / GPTQ settings: a run with --calib-file benched (and reported as its own)
    the dynamic-scale engine an earlier run had built, and the other way round."""
    import kiln.build
    from kiln.bench import offline

    built: list[Path] = []

    def fake_build(ckpt, engine_dir, cfg, **kw):
        built.append(Path(engine_dir))
        Path(engine_dir).mkdir(parents=True)
        (Path(engine_dir) / "engine.json").write_text("{}")
        return Path(engine_dir)

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kiln.build, "build", fake_build)
    monkeypatch.setattr(offline, "LLMEngine", lambda d, runtime: SimpleNamespace(engine_dir=d))
    text = tmp_path / "calib.txt"
    text.write_text("some text to calibrate on. " * 20)
    other = tmp_path / "other.txt"
    other.write_text("other text to calibrate on. " * 20)
    runs = [[], ["--quantization", "fp8"], ["--quantization", "fp8", "--calib-file", str(text)],
            ["--quantization", "fp8", "--calib-file", str(other)],
            ["--quantization", "int8_sq"], ["--quantization", "int8_sq", "--smooth-alpha", "0.8"],
            ["--quantization", "int4_gptq"], ["--quantization", "int4_gptq", "--act-order"]]
    dirs = [offline._engine(_bench_args(*flags)).engine_dir for flags in runs]
    assert built == dirs and len(set(dirs)) == len(runs), [d.name for d in dirs]
    assert dirs[0].name == "random-smollm2-135m-auto-256"  # names as before
    assert dirs[1].name == "random-smollm2-135m-auto-fp8-256"
    again = offline._engine(_bench_args("--quantization", "fp8", "--calib-file", str(text)))
    assert again.engine_dir == dirs[2] and len(built) == len(runs)  # found, not rebuilt


def test_bench_prompts_fit_a_tiny_vocabulary():
    """Prompt ids were drawn from [100, vocab - 100): a vocabulary of 200 tokens or fewer
    (a tiny test model) was a ValueError traceback."""
    from kiln.bench.offline import _prompts

    for vocab in (128, 200, 256, 32000):
        ids = [t for p in _prompts(3, 50, vocab) for t in p]
        assert 0 <= min(ids) and max(ids) < vocab, vocab
    assert min(t for p in _prompts(3, 50, 32000) for t in p) >= 100  # as before


# ---- 3. kiln eval summarize --compare-hf: the model's source, checked first ---------------
@pytest.fixture(scope="module")
def news(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("news") / "news.jsonl"
    path.write_text(json.dumps({"article": "The cat sat on the mat. " * 4,
                                "summary": "A cat sat."}) + "\n")
    return path


@pytest.mark.parametrize("what", ["engine", "file", "other-model"])
def test_compare_hf_that_is_not_the_models_source_is_one_line(what, news, tmp_path, capsys):
    """An engine dir, a file or another model's folder ran kiln's summaries first and then
    ended in a transformers traceback (ValueError, OSError, IndexError in the embedding)."""
    engine = tiny_chat_engine()
    compare, message = {
        "engine": (engine, f"--compare-hf: {engine} is a kiln engine; transformers needs the "
                   f"HF folder or .gguf it was built from ({engine.parent / 'hf'})"),
        "file": (news, f"--compare-hf: {news} is neither a HuggingFace model folder nor a "
                 ".gguf file"),
        "other-model": (tmp_path / "hf", f"--compare-hf: {tmp_path / 'hf'} has 256 tokens in "
                        "its vocabulary, the model 49152: name the same model's HF folder or "
                        ".gguf"),
    }[what]
    if what == "other-model":
        make_hf_model("llama", compare)
        capsys.readouterr()
    assert main(["eval", "summarize", str(engine), "--data", str(news), "--device", "cpu",
                 "--max-tokens", "4", "--compare-hf", str(compare)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"kiln: error: {message}\n", captured.err
    assert "summarize:" not in captured.out  # nothing was generated


# ---- 4. kiln eval on an engine without a tokenizer says what to do -------------------------
def test_eval_without_a_tokenizer_says_how_to_fix_it(news, tmp_path, capsys):
    from kiln.build import build
    from kiln.config import BuildConfig

    make_hf_model("llama", tmp_path / "hf")
    engine = build(tmp_path / "hf", tmp_path / "engine",
                   BuildConfig(dtype="float32", max_seq_len=64), progress=False)
    capsys.readouterr()
    text = tmp_path / "text.txt"
    text.write_text("some text " * 20)
    for command in (["perplexity", str(engine), "--file", str(text)],
                    ["summarize", str(engine), "--data", str(news)]):
        assert main(["eval", *command, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"kiln: error: {engine} has no tokenizer") and \
            "add the model's tokenizer.json" in err and err.count("\n") == 1, err


def test_kiln_cache_empty_or_with_a_tilde(monkeypatch, tmp_path):
    """KILN_CACHE set but empty is the default cache, not ./engines; a quoted `~` (the
    shell did not expand it) is the home folder."""
    from kiln.resolve import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KILN_CACHE", "")
    assert cache_dir() == tmp_path / ".cache" / "kiln"
    monkeypatch.setenv("KILN_CACHE", "~/engines-here")
    assert cache_dir() == tmp_path / "engines-here"
