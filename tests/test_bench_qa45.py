"""What a QA pass of `kiln bench` and `kiln eval perplexity` found (45th session):
`--profile DIR --compare-hf` set the profiled run (slowed by the profiler) against
transformers; a bad numeric option printed the mode's 28-line usage before the error;
`kiln bench serving --output-len 1` warned twice about an empty legend; `kiln eval
perplexity` said "over N tokens" with N the tokens read, not those scored."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from kiln.cli import main
from tests.test_serve_support import serve, tiny_chat_engine


# ---- --profile with --compare-hf --------------------------------------------------------
@pytest.mark.parametrize("compare", [True, False])
def test_profile_with_compare_hf_times_a_plain_run(compare, tmp_path, monkeypatch, capsys):
    """With --compare-hf the table, JSON and ratio come from a plain timed run; a second
    run under the profiler (on prompts of its own: the first run's are in the prefix
    cache) only writes the trace. Without it the profiled run is the timed one, as before."""
    from kiln.bench import hf_reference, offline
    from kiln.runtime import profiling

    runs = []
    run_engine = offline._run_engine

    def watched(engine, prompts, output_len, progress=True):
        result = run_engine(engine, prompts, output_len, progress)
        runs.append((profiling.enabled(), prompts, result))
        return result

    hf = {"seconds": 1.0, "ttft_ms": 5.0, "tpot_ms": 2.0, "output_tok_s": 7.0,
          "total_tok_s": 30.0}
    monkeypatch.setattr(offline, "_run_engine", watched)
    monkeypatch.setattr(hf_reference, "run_hf", lambda *a, **k: hf)
    out, prof = tmp_path / "r.json", tmp_path / "prof"
    code = main(["bench", "throughput", str(tiny_chat_engine()), "--input-len", "12",
                 "--output-len", "6", "--num-requests", "3", "--device", "cpu",
                 "--profile", str(prof), "--out", str(out)] + (["--compare-hf"] * compare))
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert (prof / "trace.json").exists() and (prof / "ops.txt").exists()
    timed = runs[1:]  # after the warm-up
    if not compare:
        assert [on for on, _, _ in timed] == [True]
        assert result["kiln"]["output_tok_s"] == timed[0][2]["output_tok_s"]
        assert result["profile"]["timed_run"] == "profiled"
        return
    (plain_on, plain_prompts, plain), (prof_on, prof_prompts, profiled) = timed
    assert not plain_on and prof_on
    assert len(prof_prompts) == len(plain_prompts) == 3
    assert not set(map(tuple, prof_prompts)) & set(map(tuple, plain_prompts))
    assert result["kiln"]["output_tok_s"] == plain["output_tok_s"]
    assert result["speedup_output_tok_s"] == pytest.approx(plain["output_tok_s"] / 7.0)
    assert result["profile"]["output_tok_s"] == profiled["output_tok_s"]
    assert result["profile"]["timed_run"].startswith("plain")
    assert f"{plain['output_tok_s']:.1f}" in printed.split("kiln / transformers")[0]
    assert "the table is a plain run's" in printed


# ---- bad numeric options: one line ------------------------------------------------------
@pytest.mark.parametrize("mode, flag, value, why", [
    ("latency", "--output-len", "0", "expected a whole number >= 1, got '0'"),
    ("latency", "--input-len", "abc", "expected a whole number >= 1, got 'abc'"),
    ("throughput", "--num-requests", "0", "expected a whole number >= 1, got '0'"),
    ("throughput", "--hf-batch", "0", "expected a whole number >= 1, got '0'"),
    ("throughput", "--kv-fraction", "half", "invalid float value: 'half'"),
    ("serving", "--output-len", "0", "expected a whole number >= 1, got '0'"),
    ("serving", "--input-len", "abc", "expected a whole number >= 1, got 'abc'"),
    ("serving", "--num-prompts", "0", "expected positive numbers like 1,4,16"),
])
def test_a_bad_numeric_option_is_one_line(mode, flag, value, why, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", mode, flag, value])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == (f"kiln: error: argument {flag}: {why} (see kiln bench {mode} "
                            "--help)\n") and not captured.out


# ---- kiln bench serving --output-len 1: no empty legends --------------------------------
def test_serving_bench_of_one_token_answers_draws_no_empty_legend(tmp_path, capsys):
    """One-token answers have no TPOT or ITL: those panels stay empty, without the
    'No artists with labels found to put in legend' warning each."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "r.json"
    with serve() as server, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["bench", "serving", "--url", server.url, "--concurrency", "1",
                     "--num-prompts", "2", "--input-len", "8", "--output-len", "1",
                     "--out", str(out)]) == 0
    assert not [w for w in caught if "legend" in str(w.message)], [str(w.message) for w in caught]
    assert "legend" not in capsys.readouterr().err
    level = json.loads(out.read_text())["levels"][0]
    assert level["num_ok"] == 2 and level["tpot_ms"]["p50"] is None
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


# ---- kiln eval perplexity: the tokens scored ----------------------------------------------
def test_perplexity_counts_the_tokens_it_scored(tmp_path, capsys):
    """Each window's first token has no context, and a last window of one token is not
    scored at all: 2 windows of 16 then 1 token -> 15 + 15 scored of 33 read."""
    from kiln import LLM
    from kiln.eval import sequence_logits, text_perplexity

    engine = LLM(tiny_chat_engine(), device="cpu").engine
    words = "the quick brown fox jumps over the lazy dog and runs far away " * 8
    ids = engine.tokenizer.encode(words)[:33]
    text = engine.tokenizer.decode(ids)
    assert engine.tokenizer.encode(text) == ids
    ppl, scored, window = text_perplexity(engine, text, 16)
    assert (scored, window) == (30, 16)
    nll = sum(torch.nn.functional.cross_entropy(
        sequence_logits(engine, chunk)[:-1], torch.tensor(chunk[1:]), reduction="sum").item()
        for chunk in (ids[:16], ids[16:32]))
    assert ppl == pytest.approx(math.exp(nll / 30), rel=1e-5)
    path = tmp_path / "t.txt"
    path.write_text(text)
    assert main(["eval", "perplexity", str(tiny_chat_engine()), "--file", str(path),
                 "--window", "16", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip().endswith(
        f"perplexity {ppl:.4f} over 30 tokens scored (window 16)")
