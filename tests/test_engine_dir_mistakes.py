"""An engine dir used the wrong way (found by trying, 39th session): build options given
with a built engine were ignored without a word, and a damaged or hand-edited engine dir
ended in a Python traceback. Each is now one `kiln: error` line; and the Python API checks
what it is given (prompts and their params, runtime limits, sampling values' types)."""

from __future__ import annotations

import json
import shutil

import pytest

from kiln import LLM, SamplingParams
from kiln.cli import main
from kiln.errors import KilnError, RequestError
from kiln.runtime.config import RuntimeConfig


@pytest.fixture(scope="module")
def engine():
    from tests.test_serve_support import tiny_chat_engine

    return tiny_chat_engine()


def _run(path, capsys, *extra: str) -> str:
    """`kiln run` on path: the one error line it prints (exit code 2)."""
    code = main(["run", str(path), "--prompt", "hi", "--max-tokens", "2", "--device", "cpu",
                 *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), err
    return lines[0]


def test_build_options_of_a_built_engine_are_fixed(engine, capsys):
    line = _run(engine, capsys, "--dtype", "bfloat16", "--kv-cache-dtype", "fp8")
    assert "--dtype bfloat16 (it has float32)" in line and "--kv-cache-dtype fp8" in line
    assert "--tp-size 2" in _run(engine, capsys, "--tp-size", "2")
    with pytest.raises(KilnError, match="--quantization int8_wo"):
        LLM(engine, device="cpu", quantization="int8_wo")
    # the options it was built with, and runtime limits, are fine
    assert main(["run", str(engine), "--prompt", "hi", "--max-tokens", "2", "--device", "cpu",
                 "--dtype", "float32", "--max-seq-len", "64"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("edit,words", [
    (lambda d: d["model"].update(hidden_size=128), "does not hold the model"),
    (lambda d: d["model"].update(num_layers=3), "do not match the model"),
    (lambda d: d.pop("model"), "damaged or was edited"),
    (lambda d: d["model"].update(num_heads="four"), "model.num_heads is 'four'"),
    (lambda d: d["build"].update(max_seq_len=-1), "build.max_seq_len is -1"),
    (lambda d: d["build"].update(dtype="float99"), "build.dtype is 'float99'"),
    (lambda d: d["build"].update(tp_size=2), "lacks rank1.safetensors"),
    (lambda d: d["model"].update(position_embedding="bogus"),
     "model.position_embedding is 'bogus' (kiln knows rope, learned, alibi)"),
    (lambda d: d["model"].update(hidden_act="foo"), "model.hidden_act is 'foo' (kiln knows silu"),
    (lambda d: d["model"].update(norm_type="foo"), "model.norm_type is 'foo'"),
])
def test_an_edited_engine_json_is_one_line(engine, tmp_path, capsys, edit, words):
    copy = shutil.copytree(engine, tmp_path / "e")
    data = json.loads((copy / "engine.json").read_text())
    edit(data)
    (copy / "engine.json").write_text(json.dumps(data))
    assert words in _run(copy, capsys)


def test_damaged_weight_files_are_one_line(engine, tmp_path, capsys):
    copy = shutil.copytree(engine, tmp_path / "e")
    weights = copy / "rank0.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "rank0.safetensors cannot be read" in _run(copy, capsys)
    weights.unlink()
    assert "lacks rank0.safetensors" in _run(copy, capsys)
    shutil.copy(engine / "rank0.safetensors", weights)
    (copy / "engine.json").unlink()
    assert "holds engine weights but no engine.json" in _run(copy, capsys)


def test_generate_checks_prompts_and_params(engine):
    llm = LLM(engine, device="cpu")
    one = SamplingParams(max_tokens=2, temperature=0)
    with pytest.raises(KilnError, match="3 prompts but 1 SamplingParams"):
        llm.generate(["a", "b", "c"], [one])
    with pytest.raises(KilnError, match="1 prompts but 2 SamplingParams"):
        llm.generate(["a"], [one, one])
    for bad in (None, 5, [1.5, 2], ["a", None]):
        with pytest.raises(KilnError, match=r"prompts(\[\d\])? must be"):
            llm.generate(bad, one)
    texts = [o.text for o in llm.generate(["a", [5, 6]], [one, one])]
    assert texts == [llm.generate("a", one)[0].text, llm.generate([5, 6], one)[0].text]


@pytest.mark.parametrize("options,words", [
    (dict(max_batch_size=0), "max_batch_size must be a whole number >= 1, got 0"),
    (dict(max_num_tokens=-1), "max_num_tokens must be"),
    (dict(attention_sinks=-1), "attention_sinks must be"),
    (dict(prefill_graph_tokens=-1), "prefill_graph_tokens must be"),
    (dict(kv_cache_memory_fraction=0), "kv_cache_memory_fraction must be in (0, 1]"),
])
def test_runtime_limits_are_checked(options, words):
    with pytest.raises(KilnError, match=words.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        RuntimeConfig(device="cpu", **options)


@pytest.mark.parametrize("options,words", [
    (dict(max_tokens="5"), "max_tokens must be a whole number"),
    (dict(max_tokens=2.5), "max_tokens must be a whole number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(top_p="high"), "top_p must be a finite number"),
    (dict(seed=True), "seed must be a whole number"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens must be at most max_tokens"),
])
def test_sampling_values_of_the_wrong_kind(options, words):
    with pytest.raises(KilnError, match=words):
        SamplingParams(**options)


def test_bad_build_choices_fail_before_building(tmp_path, monkeypatch, capsys):
    """An unknown dtype or quantization given to LLM(...) for a source to build: one
    error, no "building ... (once)" line first, nothing in the cache."""
    from tests.test_serve_support import tiny_chat_checkpoint

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    for options, words in ((dict(dtype="float8"), "--dtype 'float8'"),
                           (dict(quantization="foo"), "--quantization 'foo'"),
                           (dict(kv_cache_dtype="fp16"), "--kv-cache-dtype 'fp16'")):
        with pytest.raises(KilnError, match=words):
            LLM(tiny_chat_checkpoint(), device="cpu", **options)
    assert "building" not in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()


def test_a_model_of_few_positions_is_built_once(tmp_path, monkeypatch, capsys):
    """Built without --max-seq-len, an engine gets the model's trained positions where
    they are fewer than the default 4096; the cache finds it again (it was rebuilt on every
    run while the cache compared it with 4096)."""
    from tests.test_serve_support import tiny_chat_checkpoint

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    first = LLM(tiny_chat_checkpoint(), device="cpu")
    second = LLM(tiny_chat_checkpoint(), device="cpu")
    assert capsys.readouterr().out.count("building") == 1
    assert first.engine_dir == second.engine_dir
    assert first.engine.max_seq_len == json.loads(
        (tiny_chat_checkpoint() / "config.json").read_text())["max_position_embeddings"]


def test_run_checks_sampling_options_before_loading(tmp_path, capsys):
    line = _run(tmp_path / "no-such-model", capsys, "--temperature", "-1")
    assert "temperature must be >= 0" in line


def test_api_calls_that_cannot_work(engine):
    from kiln.runtime.beam_search import BeamSearchParams

    llm = LLM(engine, device="cpu")
    with pytest.raises(KilnError, match="beam_width must be at most the vocabulary"):
        llm.beam_search("Hi", BeamSearchParams(beam_width=10**6))
    with pytest.raises(KilnError, match="at least one message"):
        llm.chat([])
    with pytest.raises(KilnError, match=r"LLM\(\) got unknown option\(s\) bogus_option"):
        LLM(engine, device="cpu", bogus_option=3)


def test_streams_read_in_turns_keep_their_whole_text(engine):
    """Several LLMEngine.stream iterators advanced in turns: each gets its whole text (a
    step one of them ran used to drop the others' last pieces)."""
    llm = LLM(engine, device="cpu")
    prompts = ["The capital of France is", "Once upon a time", "Hello"]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (9, 16, 5)]
    want = [o.text for o in llm.generate(prompts, params)]
    streams = [llm.engine.stream(p, sp) for p, sp in zip(prompts, params)]
    got, live = [""] * 3, [True] * 3
    while any(live):
        for i, it in enumerate(streams):
            if live[i]:
                try:
                    got[i] += next(it)
                except StopIteration:
                    live[i] = False
    assert got == want and not llm.engine.has_unfinished()


def test_any_int64_seed_samples_the_same_each_time(engine):
    """Any int64 seed, negative or past 2**62, gives the same text each time (the Triton
    routes' UINT64 seeds arrive as the int64 of the same bits); one outside int64 is a
    RequestError."""
    llm = LLM(engine, device="cpu")
    texts = [llm.generate("Hi", SamplingParams(max_tokens=8, seed=s))[0].text
             for s in (2**63 - 1, 2**63 - 1, -5, -5)]
    assert texts[0] == texts[1] and texts[2] == texts[3]
    with pytest.raises(RequestError, match="seed must be a signed 64-bit integer"):
        llm.generate("Hi", SamplingParams(max_tokens=8, seed=2**64 - 1))
