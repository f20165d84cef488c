"""Command-line mistakes found by trying them (34th session), each now one clear line before
any build or load: a device this machine cannot run (`kiln run --device cuda` on a CPU-only
machine was a torch traceback), `kiln bench` counts below 1 (`--num-requests 0` was an
IndexError after the engine loaded)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kiln
from kiln import LLM
from kiln.errors import KilnError
from kiln.runtime.config import RuntimeConfig, resolve_device


def test_resolve_device_names_what_is_wrong(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for name, message in {"tpu": "unknown device 'tpu'", "mps": "not 'mps'",
                          "cpu:1": "not 'cpu:1'", "": "unknown device ''"}.items():
        with pytest.raises(KilnError, match=message):
            RuntimeConfig(device=name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KilnError, match="use --device cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(KilnError, match="'cuda:2' asked for, but 2 GPUs are visible"):
        resolve_device("cuda:2")


def test_a_multi_rank_engine_refuses_one_gpu_index(monkeypatch, tmp_path):
    from kiln.build import build
    from kiln.config import BuildConfig
    from tests.test_serve_support import tiny_chat_checkpoint

    engine = build(tiny_chat_checkpoint(), tmp_path / "tp2",
                   BuildConfig(dtype="float32", max_seq_len=64, tp_size=2), progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(KilnError, match="2-rank engine takes GPUs 0-1"):
        LLM(engine, device="cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's message")
def test_kiln_run_on_a_gpu_that_is_not_there_is_one_line(tmp_path):
    """Before the default model is even looked for or built."""
    run = subprocess.run([sys.executable, "-m", "kiln", "run", str(tmp_path / "missing"),
                          "--prompt", "hi", "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        "kiln: error: device 'cuda' asked for, but this torch is a CPU build; use --device "
        "cpu (or auto)"], run.stderr


@pytest.mark.parametrize("flag,value", [("--num-requests", "0"), ("--input-len", "-3"),
                                        ("--output-len", "x"), ("--hf-batch", "0")])
def test_kiln_bench_counts_below_one_are_refused(flag, value, capsys):
    from kiln.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "latency", "/nonexistent/engine", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected a whole number >= 1, got '{value}'" in err, err


def test_a_max_seq_len_whose_kv_cache_does_not_fit_is_one_line(monkeypatch, tmp_path):
    """`kiln run --max-seq-len 999999` on the default model built it and then died in the
    CPU allocator (a 46 GB KV cache on a 24 GB machine), and every later `kiln run` of the
    default model with it. Now the engine refuses with what fits; the built engine still
    serves a shorter max_seq_len (a runtime setting)."""
    from kiln import SamplingParams
    from kiln.build import build
    from kiln.config import BuildConfig
    from kiln.runtime import kv_cache
    from tests.test_serve_support import tiny_chat_checkpoint

    engine = build(tiny_chat_checkpoint(), tmp_path / "e",
                   BuildConfig(dtype="float32", max_seq_len=4000), progress=False)
    llm = LLM(engine, device="cpu", max_seq_len=64)
    per_block = llm.engine.runner.kv_bytes_per_block()
    del llm
    monkeypatch.setattr(kv_cache, "_cpu_available", lambda: 20 * per_block)  # 16-token blocks
    with pytest.raises(KilnError, match=r"one request of max_seq_len=4000 needs [\d.]+ GB of KV "
                       r"cache and this machine has 0.0 GB free: lower --max-seq-len \(a runtime "
                       r"setting; about 304 tokens fit\)"):
        LLM(engine, device="cpu")
    llm = LLM(engine, device="cpu", max_seq_len=64)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4
    with pytest.raises(KilnError, match="needs"):
        kv_cache.auto_num_blocks(1 << 40, torch.device("cpu"), 0.9, 1 << 30, 8, 16, 16)


@pytest.mark.parametrize("options, message", [
    (["--kv-fraction", "0"], "--kv-fraction must be in (0, 1]"),
    (["--kv-fraction", "2"], "--kv-fraction must be in (0, 1]"),
    (["--max-seq-len", "10"], "--max-seq-len 10 leaves no room for --input-len 16 + "
     "--output-len 4 = 20 tokens"),
    (["--out", "{tmp}/afile.txt/x.json"], "afile.txt is a file, not a directory"),
    (["--out", "{tmp}"], "is a directory"),
    (["--profile", "{tmp}/afile.txt"], "--profile {tmp}/afile.txt is a file"),
])
def test_kiln_bench_options_are_checked_before_any_work(options, message, tmp_path, capsys):
    """--kv-fraction 0 or 2 ran (unchecked on the CPU); --max-seq-len below input + output
    ran past it; an --out under a regular file failed with a traceback after the whole
    benchmark. Now each is one line before the model is even looked for."""
    from kiln.cli import main

    (tmp_path / "afile.txt").write_text("")
    options = [o.format(tmp=tmp_path) for o in options]
    code = main(["bench", "latency", str(tmp_path / "no-engine"), "--input-len", "16",
                 "--output-len", "4", *options])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kiln: error: ")
    assert message.format(tmp=tmp_path) in err and err.count("\n") == 1, err


def test_kiln_bench_max_seq_len_is_the_engines_runtime_limit(tiny_engines, capsys):
    """On a built engine --max-seq-len was ignored; now it is the runtime limit `kiln run`
    sets: at most the built one (256 here)."""
    from kiln.cli import main

    code = main(["bench", "latency", str(tiny_engines["llama"]), "--input-len", "16",
                 "--output-len", "4", "--max-seq-len", "300", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kiln: error: max_seq_len 300 exceeds the 256"), err


def test_kiln_bench_serving_out_is_checked_before_the_run(tmp_path, capsys):
    from kiln.cli import main

    (tmp_path / "afile.txt").write_text("")
    code = main(["bench", "serving", "--url", "http://127.0.0.1:9", "--out",
                 str(tmp_path / "afile.txt" / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kiln: error: --out ") and "is a file" in err, err


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "-1", "temperature must be >= 0, got -1.0"),
    ("--max-tokens", "0", "max_tokens must be at least 1, got 0"),
    ("--top-p", "2", "top_p must be in (0, 1], got 2.0"),
])
def test_kiln_chat_sampling_options_are_checked_before_loading(flag, value, message, tmp_path,
                                                               capsys):
    """They loaded the model, printed the banner and failed at the first message."""
    from kiln.cli import main

    code = main(["chat", str(tmp_path / "no-model"), flag, value])
    out, err = capsys.readouterr()
    assert code == 2 and err == f"kiln: error: {message}\n" and "kiln chat" not in out


CALIBRATION_TEXT = str(Path(kiln.__file__).parent / "data" / "calibration.txt")


@pytest.mark.parametrize("flags, message", [
    (["--quantization", "fp8", "--group-size", "32"], "--group-size 32 has no effect with "
     "--quantization fp8: it applies to int8_wo, int4_wo, int4_awq, int4_gptq; drop it or "
     "pick one of those"),
    (["--quantization", "int8_sq", "--group-size", "32"],
     "--group-size 32 has no effect with --quantization int8_sq"),
    (["--quantization", "int4_wo", "--act-order"],
     "--act-order has no effect with --quantization int4_wo: it applies to int4_gptq"),
    (["--quantization", "none", "--smooth-alpha", "0.9"],
     "--smooth-alpha 0.9 has no effect with --quantization none: it applies to int8_sq"),
    (["--quantization", "int8_wo", "--activation-scheme", "static"],
     "--activation-scheme static has no effect with --quantization int8_wo: it applies to fp8"),
    (["--group-size", "32"], "--group-size 32 has no effect with --quantization none (auto: "),
    (["--quantization", "int8_wo", "--calib-file", CALIBRATION_TEXT], "--calib-file has no "
     "effect with --quantization int8_wo and --kv-cache-dtype auto: calibration sets static "
     "FP8 input scales, int8_sq/int4_awq/int4_gptq's statistics and fp8/int8 KV scales; drop "
     "it"),
    (["--quantization", "int4_wo", "--group-size", "0"], "int4 groups of 128 inputs (the "
     "default: --group-size not given, or 0) do not divide the model's hidden size (q/k/v, "
     "gate/up inputs), 64; give --group-size, a positive even number that divides every "
     "layer's inputs (e.g. 64)"),
    (["--quantization", "int4_wo", "--group-size", "48"], "--group-size 48 does not divide "
     "the model's hidden size (q/k/v, gate/up inputs), 64: the group size must be a positive "
     "even number that divides every layer's inputs; try --group-size 64"),
])
@pytest.mark.parametrize("command", ["build", "bench", "LLM"])
def test_build_options_that_do_nothing_are_refused(command, flags, message, tiny_checkpoints,
                                                   tmp_path, capsys, monkeypatch):
    """Options of another quantization method were accepted and ignored (`--quantization
    fp8 --group-size 32` built plain FP8); now one line before any work, from `kiln build`,
    `kiln bench` and LLM(...) alike (all through kiln.build.builder.validate and
    plan_quantization). Options left at their defaults count as not given."""
    from kiln.cli import main
    from kiln.errors import BuildError

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    folder, _ = tiny_checkpoints["llama"]
    if command == "LLM":
        options = {flags[i].lstrip("-").replace("-", "_"): flags[i + 1] for i in range(
            0, len(flags), 2) if flags[i] != "--act-order"}
        options = {k: float(v) if k == "smooth_alpha" else int(v) if k == "group_size" else v
                   for k, v in options.items()}
        if "--act-order" in flags:
            options["act_order"] = True
        with pytest.raises(BuildError) as e:
            LLM(str(folder), device="cpu", dtype="float32", **options)
        assert str(e.value) == message or str(e.value).startswith(message), str(e.value)
        return
    args = ["build", str(folder), "-o", str(tmp_path / "e")] if command == "build" else \
        ["bench", "latency", str(folder), "--input-len", "8", "--output-len", "2",
         "--device", "cpu"]
    code = main([*args, "--dtype", "float32", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"kiln: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "e").exists() and not (tmp_path / "cache" / "engines").exists()


def test_build_options_at_their_defaults_count_as_not_given(tiny_checkpoints):
    from kiln.build.builder import validate
    from kiln.build.quantize import plan_quantization
    from kiln.checkpoint import open_checkpoint
    from kiln.config import QUANTIZATIONS, BuildConfig

    ckpt = open_checkpoint(tiny_checkpoints["llama"][0])
    cfg = ckpt.config
    for method in QUANTIZATIONS:
        validate(cfg, BuildConfig(quantization=method))
    validate(cfg, BuildConfig(quantization="int4_gptq", group_size=32, act_order=True))
    validate(cfg, BuildConfig(quantization="int8_sq", smooth_alpha=0.8))
    validate(cfg, BuildConfig(quantization="fp8", activation_scheme="dynamic"))
    # `kiln eval quality` builds its float reference with the FP8 formats' options (and
    # without their calibration text, which changes nothing there)
    plan = plan_quantization(ckpt, BuildConfig(activation_scheme="static"))
    assert plan.quant.method == "none"
