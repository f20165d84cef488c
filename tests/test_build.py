"""Build: engine dir layout, round trip, every checkpoint format, and clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln import LLM, SamplingParams
from kiln.build import build, load_engine_config
from kiln.config import BuildConfig
from kiln.errors import BuildError, CheckpointError, KilnError
from tests.conftest import make_hf_model

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPT = [3, 14, 15, 92, 65]
F32 = BuildConfig(dtype="float32", max_seq_len=128)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama") / "hf"
    make_hf_model("llama", folder)
    return folder


@pytest.fixture(scope="module")
def reference_tokens(llama_folder, tmp_path_factory) -> list[int]:
    engine = build(llama_folder, tmp_path_factory.mktemp("ref") / "e", F32, progress=False)
    return LLM(engine, device="cpu").generate(PROMPT, GREEDY)[0].token_ids


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_engine_dir_layout_and_round_trip(llama_folder, reference_tokens, tmp_path, monkeypatch):
    engine = build(llama_folder, tmp_path / "engine", F32, progress=False)
    cfg = load_engine_config(engine)
    assert cfg.model.architecture == "LlamaForCausalLM"
    assert cfg.build.dtype == "float32" and cfg.build.max_seq_len == 128
    assert cfg.source["fingerprint"]
    names = set(load_file(str(engine / "rank0.safetensors")))
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.1.mlp.gate_up_proj.weight" in names
    assert not any("q_proj" in n or "gate_proj." in n for n in names)
    # Loading an engine converts nothing: the checkpoint readers are never touched.
    import kiln.checkpoint

    def no_conversion(*args, **kwargs):
        raise AssertionError("the runtime opened a checkpoint")

    monkeypatch.setattr(kiln.checkpoint, "open_checkpoint", no_conversion)
    monkeypatch.setattr("kiln.resolve.open_checkpoint", no_conversion)
    assert LLM(engine, device="cpu").generate(PROMPT, GREEDY)[0].token_ids == reference_tokens


def test_sharded_safetensors_and_bin_give_same_tokens(tmp_path, reference_tokens):
    sharded = tmp_path / "sharded"
    model = make_hf_model("llama", sharded)
    shutil.rmtree(sharded)
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(sharded / "config.json", binary)
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    for folder in (sharded, binary):
        engine = build(folder, tmp_path / f"e-{folder.name}", F32, progress=False)
        assert LLM(engine, device="cpu").generate(PROMPT, GREEDY)[0].token_ids == \
            reference_tokens


def test_llm_builds_hf_folder_into_cache(llama_folder, reference_tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    llm = LLM(llama_folder, BuildConfig(dtype="float32", max_seq_len=128), device="cpu")
    assert llm.engine_dir.is_relative_to(tmp_path)
    assert llm.generate(PROMPT, GREEDY)[0].token_ids == reference_tokens
    # Second time: the cached engine is reused, not rebuilt.
    mtime = (llm.engine_dir / "engine.json").stat().st_mtime_ns
    again = LLM(llama_folder, BuildConfig(dtype="float32", max_seq_len=128), device="cpu")
    assert again.engine_dir == llm.engine_dir
    assert (again.engine_dir / "engine.json").stat().st_mtime_ns == mtime


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


BAD_SOURCES = {
    "missing path": (lambda f, t: t / "nope", "does not exist"),
    "no config.json": (lambda f, t: (copy_folder(f, t / "x") / "config.json").unlink() or t / "x",
                       "no config.json"),
    "unknown architecture": (
        lambda f, t: _edit_config(copy_folder(f, t / "x"), architectures=["MambaForCausalLM"],
                                  model_type="mamba")
        or t / "x", "unsupported architecture 'MambaForCausalLM' (model_type 'mamba'); "
                    "kiln supports: .*"
                    "GPT2LMHeadModel, GPTNeoXForCausalLM, PhiForCausalLM"),
    "shape mismatch": (
        lambda f, t: _edit_config(copy_folder(f, t / "x"), intermediate_size=96) or t / "x",
        "does not match the config"),
    "bad config json": (
        lambda f, t: [(copy_folder(f, t / "x") / "config.json").write_text("{oops"),
                      t / "x"][1], "not valid JSON"),
    "no weights": (
        lambda f, t: (copy_folder(f, t / "x") / "model.safetensors").unlink() or t / "x",
        "has no weights"),
}


def _truncate(folder: Path, tmp: Path) -> Path:
    dst = copy_folder(folder, tmp / "x")
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return dst


def _drop_tensor(folder: Path, tmp: Path) -> Path:
    from safetensors.torch import save_file

    dst = copy_folder(folder, tmp / "x")
    state = load_file(str(dst / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _edit_tensor(name: str, edit):
    """A source whose tensor `name` is edit(tensor) (the .bin format: any dtype, unlike
    what config.json says)."""
    def make(folder: Path, tmp: Path) -> Path:
        from safetensors.torch import save_file

        dst = copy_folder(folder, tmp / "x")
        state = load_file(str(dst / "model.safetensors"))
        state[name] = edit(state[name].clone())
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return dst
    return make


def _poke(value: float):
    def edit(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[[5, 17]] = value
        return t
    return edit


BAD_SOURCES["NaN weights"] = (
    _edit_tensor("model.layers.1.mlp.down_proj.weight", _poke(float("nan"))),
    "checkpoint tensor 'model.layers.1.mlp.down_proj.weight' holds 2 NaN and 0 infinite "
    "value(s) of 8192: the file is corrupt")
BAD_SOURCES["infinite norm"] = (
    _edit_tensor("model.norm.weight", _poke(-float("inf"))),
    "'model.norm.weight' holds 0 NaN and 2 infinite value(s) of 64")
BAD_SOURCES["integer weight"] = (
    _edit_tensor("model.layers.0.self_attn.q_proj.weight", lambda t: (t * 100).to(torch.int32)),
    "checkpoint tensor 'model.layers.0.self_attn.q_proj.weight' is int32 where kiln expects "
    "float weights, and config.json has no quantization_config saying how to read it")
BAD_SOURCES["stray FP8 weight"] = (
    _edit_tensor("model.layers.0.mlp.up_proj.weight", lambda t: t.to(torch.float8_e4m3fn)),
    "'model.layers.0.mlp.up_proj.weight' is float8_e4m3fn where kiln expects float weights")
BAD_SOURCES["truncated safetensors"] = (_truncate, "truncated")
BAD_SOURCES["missing tensor"] = (_drop_tensor, "missing 1 tensor(s): model.layers.1.mlp")


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_fails_with_clear_error(case, llama_folder, tmp_path):
    make_source, message = BAD_SOURCES[case]
    source = make_source(llama_folder, tmp_path)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(source, tmp_path / "out", F32, progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-built left behind


@pytest.mark.parametrize("cfg, message", [
    (BuildConfig(tp_size=3), "tp_size 3 does not divide"),
    (BuildConfig(dtype="int8"), "--dtype 'int8'"),
    (BuildConfig(max_seq_len=0), "max_seq_len must be at least 1"),
    (BuildConfig(quantization="int8_sq", smooth_alpha=2), r"--smooth-alpha 2: .* \[0, 1\]"),
    (BuildConfig(smooth_alpha=-0.1), r"--smooth-alpha -0.1"),
    (BuildConfig(quantization="fp8", group_size=-3), "--group-size -3 must be a positive"),
    (BuildConfig(quantize_lm_head="int4"), "--quantize-lm-head 'int4' is not one of"),
])
def test_bad_build_config(cfg, message, llama_folder, tmp_path):
    with pytest.raises(BuildError, match=message):
        build(llama_folder, tmp_path / "out", cfg, progress=False)


def test_a_missing_calibration_file_is_found_before_any_work(llama_folder):
    from kiln.build.builder import validate
    from kiln.checkpoint import open_checkpoint

    with pytest.raises(BuildError, match="calibration file /nonexistent/c.txt does not exist"):
        validate(open_checkpoint(llama_folder).config, BuildConfig(calib_file="/nonexistent/c.txt"))


def test_learned_positions_cap_max_seq_len(tmp_path):
    """GPT-2 has no position past its table: the default 4096 becomes its 512, so
    `kiln run gpt2-folder` works without flags, and a longer prompt is refused."""
    folder = tmp_path / "gpt2"
    make_hf_model("gpt2", folder)  # 512 learned positions
    engine = build(folder, tmp_path / "out", BuildConfig(dtype="float32"), progress=False)
    assert load_engine_config(engine).build.max_seq_len == 512
    llm = LLM(engine, device="cpu")
    assert len(llm.generate([[5] * 500], GREEDY)[0].token_ids) > 0
    with pytest.raises(KilnError, match="512"):
        llm.generate([[5] * 600], GREEDY)


def test_max_seq_len_not_given_is_the_models_positions(llama_folder, tmp_path, caplog):
    """The default 4096 past a model's 512 positions warned about a length nobody asked
    for; now the engine gets the 512. One asked for past them is built, with the warning."""
    engine = build(llama_folder, tmp_path / "default", BuildConfig(dtype="float32"),
                   progress=False)
    assert load_engine_config(engine).build.max_seq_len == 512
    assert "positions" not in caplog.text
    engine = build(llama_folder, tmp_path / "long", BuildConfig(dtype="float32",
                                                                 max_seq_len=1024),
                   progress=False)
    assert load_engine_config(engine).build.max_seq_len == 1024
    assert "max_seq_len 1024 is past the 512 positions" in caplog.text


def test_source_path_is_recorded_absolute(llama_folder, tmp_path, monkeypatch):
    """`kiln run hf` (a relative path) showed "hf" as the source in `kiln cache list`."""
    monkeypatch.chdir(llama_folder.parent)
    engine = build(Path(llama_folder.name), tmp_path / "e", F32, progress=False)
    assert load_engine_config(engine).source["path"] == str(llama_folder.resolve())


def test_a_tokenizer_past_the_models_vocab_is_refused(tmp_path):
    """A config vocab_size (258) below its tokenizer's ids built, then every text prompt
    failed at run time ("prompt token ids must be in [0, ...)"). A vocab_size above them
    (padding) builds."""
    from tests.test_eval_summarize import tiny_model_with_tokenizer

    folder = tiny_model_with_tokenizer(tmp_path / "hf")  # 258 tokens, vocab_size 258
    _edit_config(folder, vocab_size=200)
    with pytest.raises(BuildError, match="the tokenizer has 258 tokens but the model's "
                       "vocab_size is 200"):
        build(folder, tmp_path / "out", F32, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("under", ["a file", "/proc"])
def test_an_output_that_cannot_be_written_is_one_line(under, llama_folder, tmp_path):
    """-o under a regular file was a FileExistsError traceback, -o /proc/x one of
    tempfile.mkdtemp's."""
    if under == "/proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    if under == "a file":
        (tmp_path / "afile.txt").write_text("")
        out, message = tmp_path / "afile.txt" / "sub", "afile.txt is a file, not a directory"
    else:
        out, message = Path("/proc/kiln-engine"), "cannot write /proc/kiln-engine: "
    result = subprocess.run([sys.executable, "-m", "kiln", "build", str(llama_folder), "-o",
                             str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("kiln: error: cannot write") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_config_field_kiln_cannot_honour_is_named(tmp_path):
    folder = tmp_path / "gpt2"
    make_hf_model("gpt2", folder)
    _edit_config(folder, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        build(folder, tmp_path / "out", F32, progress=False)


def test_cli_reports_one_line_without_traceback(llama_folder, tmp_path):
    bad = copy_folder(llama_folder, tmp_path / "bad")
    _edit_config(bad, architectures=["MambaForCausalLM"], model_type="mamba")
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "build", str(bad), "-o",
                             str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("kiln: error: unsupported architecture")
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_build_then_run(llama_folder, reference_tokens, tmp_path):
    out = tmp_path / "engine"
    result = subprocess.run([sys.executable, "-m", "kiln.cli", "build", str(llama_folder), "-o",
                             str(out), "--dtype", "float32", "--max-seq-len", "128"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (out / "engine.json").exists()
    with pytest.raises(KilnError, match="no tokenizer"):
        LLM(out, device="cpu").generate("text needs a tokenizer", GREEDY)


def test_build_never_overwrites_user_data(llama_folder, tmp_path):
    precious = tmp_path / "models"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(BuildError, match="not a kiln engine dir"):
        build(llama_folder, precious, F32, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(BuildError, match="is the source checkpoint"):
        build(llama_folder, llama_folder, F32, progress=False)
    engine = build(llama_folder, tmp_path / "engine", F32, progress=False)
    build(llama_folder, engine, F32, progress=False)  # an engine dir may be rebuilt


def test_generation_config_eos_ids_are_merged(llama_folder, tmp_path):
    folder = copy_folder(llama_folder, tmp_path / "chat")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 77]}))
    engine = build(folder, tmp_path / "engine", F32, progress=False)
    assert load_engine_config(engine).model.eos_token_ids == (2, 77)


def test_sharded_engine_writes_every_rank(llama_folder, tmp_path):
    engine = build(llama_folder, tmp_path / "tp2", BuildConfig(dtype="float32",
                                                              max_seq_len=128, tp_size=2),
                   progress=False)
    full = load_file(str(build(llama_folder, tmp_path / "tp1", F32, progress=False)
                         / "rank0.safetensors"))
    ranks = [load_file(str(engine / f"rank{r}.safetensors")) for r in range(2)]
    name = "model.layers.0.mlp.down_proj.weight"  # row-parallel: split by input columns
    assert torch.equal(torch.cat([ranks[0][name], ranks[1][name]], dim=1), full[name])
    pipelined = build(llama_folder, tmp_path / "pp2", BuildConfig(dtype="float32",
                                                                 max_seq_len=128, pp_size=2),
                      progress=False)
    stages = [load_file(str(pipelined / f"rank{r}.safetensors")) for r in range(2)]
    assert "model.layers.0.mlp.down_proj.weight" in stages[0]  # each stage: its own layers
    assert "model.layers.1.mlp.down_proj.weight" not in stages[0]
    assert "model.layers.1.mlp.down_proj.weight" in stages[1]
