"""lm-evaluation-harness on kiln: the `kiln` model scores a local custom task (no network)
the same as the harness's `hf` model on the same checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_eval_summarize import tiny_model_with_tokenizer

lm_eval = pytest.importorskip("lm_eval")

WORDS = ("red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny_tok") / "model")


@pytest.fixture(scope="module")
def tiny_engine(tiny_folder, tmp_path_factory) -> Path:
    from kiln.build import build
    from kiln.config import BuildConfig

    return build(tiny_folder, tmp_path_factory.mktemp("tiny_tok_engine") / "engine",
                 BuildConfig(dtype="float32", max_seq_len=256, max_batch_size=16),
                 progress=False)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Three local tasks: multiple choice, rolling loglikelihood and generate_until."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    rows = [{"question": f"The {a} and the {b} are", "choices": [f" {c}" for c in WORDS[:4]],
             "answer": i % 4, "text": f"The {a} sat by the {b} near the {c}." * 2}
            for i, (a, b, c) in enumerate(zip(WORDS, WORDS[3:] + WORDS[:3], WORDS[5:] + WORDS[:5]))]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              "test_split: test\n")
    (root / "mc.yaml").write_text(
        "task: kiln_test_mc\n" + common + "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "rolling.yaml").write_text(
        "task: kiln_test_rolling\n" + common + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n")
    (root / "gen.yaml").write_text(
        "task: kiln_test_gen\n" + common + "output_type: generate_until\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: '{{choices[answer]}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


def _evaluate(model: str, model_args: str, task_dir: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import kiln.lm_eval_model  # noqa: F401  (registers `kiln`)

    return simple_evaluate(model=model, model_args=model_args,
                           tasks=["kiln_test_mc", "kiln_test_rolling", "kiln_test_gen"],
                           task_manager=TaskManager(include_path=str(task_dir)),
                           batch_size=4, device="cpu", log_samples=True,
                           bootstrap_iters=0, random_seed=0)


def test_kiln_scores_equal_hf(tiny_folder, tiny_engine, task_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ours = _evaluate("kiln", f"pretrained={tiny_engine}", task_dir)
    theirs = _evaluate("hf", f"pretrained={tiny_folder},dtype=float32", task_dir)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["kiln_test_mc"][metric] == \
            theirs["results"]["kiln_test_mc"][metric], metric
    for a, b in zip(ours["samples"]["kiln_test_mc"], theirs["samples"]["kiln_test_mc"]):
        ll_ours = [r[0][0] for r in a["resps"]]
        ll_theirs = [r[0][0] for r in b["resps"]]
        assert ll_ours == pytest.approx(ll_theirs, abs=1e-3)
    ppl = [r["results"]["kiln_test_rolling"]["word_perplexity,none"] for r in (ours, theirs)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-4)
    gen = [[s["resps"][0][0] for s in r["samples"]["kiln_test_gen"]] for r in (ours, theirs)]
    assert gen[0] == gen[1]


@pytest.mark.parametrize("device_args", [[], ["--device", "cpu"]])
def test_lm_eval_command_line(tiny_engine, task_dir, tmp_path, device_args):
    """`python -m kiln.lm_eval_model` is the harness's CLI with `--model kiln` known. As the
    README writes it (no --device: the harness passes its default, cuda:0, which picks
    like kiln's own default on this CPU machine), and with a device in model_args beside
    the harness's --device (model_args win; both used to reach the model twice)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    model_args = f"pretrained={tiny_engine}" + (",device=cpu" if device_args else "")
    result = subprocess.run(
        [sys.executable, "-m", "kiln.lm_eval_model", "run", "--model", "kiln",
         "--model_args", model_args, "--tasks", "kiln_test_mc",
         "--include_path", str(task_dir), "--output_path", str(tmp_path / "out"),
         *device_args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kiln_test_mc" in result.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))


def test_lm_eval_command_line_mistake(tiny_engine, task_dir, tmp_path):
    """A kiln mistake inside the harness (an unknown model_arg) is one line, exit 2."""
    result = subprocess.run(
        [sys.executable, "-m", "kiln.lm_eval_model", "run", "--model", "kiln",
         "--model_args", f"pretrained={tiny_engine},bogus=1", "--tasks", "kiln_test_mc",
         "--include_path", str(task_dir), "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"},
        timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "kiln: error: kiln lm-eval model: unknown model_args bogus" in result.stderr
    assert "Traceback" not in result.stderr


def test_continuation_longer_than_the_engine(tiny_engine):
    """The context is cut from the left and the continuation kept whole (scored as on an
    engine long enough for the cut sequence); a continuation that alone is longer than
    max_length is a one-line KilnError (it was a KeyError deep in the scoring)."""
    from kiln.errors import KilnError
    from kiln.lm_eval_model import KilnLM

    short = KilnLM(pretrained=str(tiny_engine), device="cpu", max_seq_len=16)
    assert short.max_length == 14
    full = KilnLM(pretrained=str(tiny_engine), device="cpu")
    context = short.tok_encode("The red cat sat by the blue river near the green tree. " * 2)
    continuation = short.tok_encode(" and the dog", add_special_tokens=False)
    assert len(context) > short.max_length
    for cut in (len(continuation), short.max_length):  # as long as the engine takes
        cont = (continuation * 8)[:cut]
        [(got, _)] = short._loglikelihood_tokens([(None, context, cont)], disable_tqdm=True)
        kept = context[-(short.max_length + 1 - cut):]
        [(want, _)] = full._loglikelihood_tokens([(None, kept, cont)], disable_tqdm=True)
        assert got == pytest.approx(want, abs=1e-4)
    for extra in (1, 4):  # no context token left / a KeyError deep in the scoring
        too_long = (continuation * 8)[:short.max_length + extra]
        with pytest.raises(KilnError, match=f"continuation of {len(too_long)} tokens is "
                           "longer than this engine can score") as error:
            short._loglikelihood_tokens([(None, context, too_long)], disable_tqdm=True)
        assert "\n" not in str(error.value)
