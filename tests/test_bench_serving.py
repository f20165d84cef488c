"""`kiln bench serving` against a test server: a table, JSON and a PNG plot."""

from __future__ import annotations

import json
import socket

import pytest

from kiln.bench.report import summarize
from kiln.cli import main
from tests.test_serve_support import MODEL, serve


def test_summarize_percentiles():
    stats = summarize([float(v) for v in range(1, 101)], scale=1000)
    assert stats["mean"] == pytest.approx(50_500)
    assert stats["p50"] == pytest.approx(50_500)
    assert stats["p90"] == pytest.approx(90_100)
    assert stats["p99"] == pytest.approx(99_010)
    assert summarize([])["p50"] is None


def test_bench_serving_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "result.json"
    with serve() as server:
        assert main(["bench", "serving", "--url", server.url, "--concurrency", "1,4",
                     "--num-prompts", "3,6", "--input-len", "16", "--output-len", "4",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == MODEL
    assert [level["concurrency"] for level in result["levels"]] == [1, 4]
    for level, count in zip(result["levels"], (3, 6)):  # one prompt count per level
        assert level["num_ok"] == count and level["num_failed"] == 0
        assert level["mean_output_tokens"] == 4  # ignore_eos: exactly output_len tokens
        assert level["mean_prompt_tokens"] >= 16
        assert 0 < level["ttft_ms"]["p50"] <= level["ttft_ms"]["p99"] <= level["e2e_ms"]["p99"]
        assert level["tpot_ms"]["p50"] > 0 and level["itl_ms"]["p90"] > 0
        assert level["output_throughput"] > 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "TTFT p99" in table and "out tok/s" in table


def test_bench_serving_reports_an_unreachable_server(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    assert main(["bench", "serving", "--url", f"http://127.0.0.1:{port}",
                 "--out", str(tmp_path / "r.json")]) == 2
    assert "failed" in capsys.readouterr().err


def test_bench_serving_refuses_prompt_counts_that_do_not_match_the_levels(tmp_path, capsys):
    assert main(["bench", "serving", "--concurrency", "1,4,16", "--num-prompts", "8,32",
                 "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "2 counts for 3 concurrency levels" in err and "Traceback" not in err


def test_random_weight_engine_serves_text(tmp_path):
    """A random-weight engine carries a word-level tokenizer over its whole vocabulary, so
    the serving sweep sends it text (the GPU serving benchmark runs on one), and chat works."""
    import dataclasses

    import openai
    import torch

    from kiln.build import build
    from kiln.checkpoint.random import PRESETS, RandomCheckpoint
    from kiln.config import BuildConfig, ModelConfig
    from kiln.tokenizer import Tokenizer

    cfg = dataclasses.replace(ModelConfig(**PRESETS["llama-3.1-8b"]), vocab_size=1024,
                              hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16, bos_token_id=1000,
                              eos_token_ids=(1001,))
    engine = build(RandomCheckpoint(cfg, dtype=torch.float32), tmp_path / "e",
                   BuildConfig(dtype="float32", max_seq_len=256), progress=False)
    tok = Tokenizer.from_engine(engine)
    assert tok is not None and tok.vocab_size == 1024 and tok.eos_token_id == 1001
    assert tok.encode("the of and") == [0, 1, 2]  # common words: one token each
    assert tok.decode([0, 1, 700, 1001]) == "the of w700"  # the special </s> skipped
    out = tmp_path / "r.json"
    with serve(engine) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "the time"}], max_tokens=5,
            temperature=0, extra_body={"ignore_eos": True})
        assert chat.usage.completion_tokens == 5 and len(chat.choices[0].message.content) > 0
        assert main(["bench", "serving", "--url", server.url, "--concurrency", "2",
                     "--num-prompts", "4", "--input-len", "12", "--output-len", "6",
                     "--out", str(out)]) == 0
    level = json.loads(out.read_text())["levels"][0]
    assert level["num_ok"] == 4 and level["mean_output_tokens"] == 6
    assert level["mean_prompt_tokens"] == 12  # twelve common words: twelve tokens
