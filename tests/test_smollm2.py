"""The default real model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from kiln import LLM, SamplingParams
from tests.conftest import smollm2_gguf

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a small village,", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def hf_smollm2():
    import transformers

    path = smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def llm(smollm2_engine):
    return LLM(smollm2_engine, device="cpu")


def test_greedy_matches_transformers(llm, hf_smollm2):
    model, tokenizer = hf_smollm2
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0,
                                                   ignore_eos=True))
    for prompt, out in zip(PROMPTS, outputs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                  pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        assert out.token_ids == want.tolist(), prompt
        assert out.text == tokenizer.decode(want, skip_special_tokens=True)


def test_paris(llm):
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))
    assert "Paris" in out[0].text


def botchan_text() -> str:
    """botchan.txt (public domain) from the sentencepiece source distribution, cached."""
    cache = Path.home() / ".cache" / "kiln" / "data"
    target = cache / "botchan.txt"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "sentencepiece", "-d", str(cache), "-q"], capture_output=True, text=True)
        sdists = sorted(cache.glob("sentencepiece-*.tar.gz"))
        if result.returncode or not sdists:
            pytest.skip(f"could not download the sentencepiece sdist: {result.stderr[-200:]}")
        with tarfile.open(sdists[-1]) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("test/botchan.txt"))
            target.write_bytes(tar.extractfile(member).read())
    return target.read_text()


def test_perplexity_matches_transformers(llm, hf_smollm2):
    from kiln.eval import perplexity

    model, tokenizer = hf_smollm2
    text = botchan_text()[5000:9000]
    ids = tokenizer(text).input_ids[:512]
    ours = perplexity(llm.engine, ids, window=512)
    with torch.no_grad():
        theirs = torch.exp(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss).item()
    assert 1 < ours < 100
    assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)


def test_cli_run_default_model_says_paris(tmp_path):
    env = {"KILN_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "run", "--prompt", "The capital of France is",
         "--max-tokens", "8"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "building" in result.stdout  # first run builds into the cache


def test_cli_eval_perplexity(smollm2_engine, tmp_path):
    text = tmp_path / "botchan.txt"
    text.write_text(botchan_text()[5000:7000])
    result = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "eval", "perplexity", str(smollm2_engine),
         "--file", str(text), "--window", "256", "--device", "cpu"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    value = float(result.stdout.split()[1])
    assert 1 < value < 100
