"""Build QA findings: -o a mount point (a Docker volume) or a symlink to a dir, a full disk,
a damaged tokenizer file (at build and in an engine), YaRN blocks that leave
original_max_position_embeddings or factor to transformers' defaults."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.build import build, load_engine_config
from kiln.build.engine_dir import is_engine_dir
from kiln.build.scratch import PREFIX
from kiln.cli import main
from kiln.config import BuildConfig
from kiln.errors import BuildError, CheckpointError, KilnError
from tests.conftest import make_hf_model

F32 = BuildConfig(dtype="float32", max_seq_len=64)
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = [3, 14, 15, 92, 65]
ENGINE = ["engine.json", "rank0.safetensors", "tokenizer"]  # what a build of `llama` writes


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, list[int]]:
    """A tiny HF Llama folder and the tokens an engine built the usual way generates."""
    folder = tmp_path_factory.mktemp("llama") / "hf"
    make_hf_model("llama", folder)
    engine = build(folder, tmp_path_factory.mktemp("ref") / "e", F32, progress=False)
    assert sorted(p.name for p in engine.iterdir()) == ENGINE
    return folder, LLM(engine, device="cpu").generate(PROMPT, GREEDY)[0].token_ids


def _mount(args: list[str], at: Path) -> None:
    """mount(8) or a skip: it needs root (CI runs as root; a developer may not)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    result = subprocess.run(["mount", *args, str(at)], capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"mount {' '.join(args)} failed: {result.stderr.strip()}")


@contextlib.contextmanager
def _tmpfs(at: Path, size: str) -> Iterator[Path]:
    at.mkdir(parents=True, exist_ok=True)
    _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs"], at)
    try:
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=False)


@contextlib.contextmanager
def _bind_mount(at: Path) -> Iterator[Path]:
    """at mounted onto itself: a mount point on the same filesystem, which
    os.path.ismount does not see (only rmdir's EBUSY tells)."""
    at.mkdir(parents=True, exist_ok=True)
    _mount(["--bind", str(at)], at)
    try:
        assert not os.path.ismount(at)
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=False)


def _generates(engine: Path) -> list[int]:
    return LLM(engine, device="cpu").generate(PROMPT, GREEDY)[0].token_ids


# ---- 1. -o an existing dir that cannot be replaced ------------------------------------------

def test_build_into_an_empty_mount_point(llama, tmp_path):
    """A Docker volume: the whole build ran, then rmtree / rename of the mount point failed
    with an EBUSY traceback and no engine. Now the engine is moved into it; a rebuild
    replaces it there; lost+found and what killed builds left are handled."""
    folder, tokens = llama
    with _tmpfs(tmp_path / "vol", "64m") as vol:
        (vol / "lost+found").mkdir()  # as a fresh ext4 volume has
        assert build(folder, vol, F32, progress=False) == vol
        assert is_engine_dir(vol) and _generates(vol) == tokens
        assert sorted(p.name for p in vol.iterdir()) == sorted(ENGINE + ["lost+found"])
        assert stat.S_IMODE((vol / "rank0.safetensors").stat().st_mode) == 0o666 & ~_umask()
        (vol / f"{PREFIX}killed").mkdir()  # a killed build's scratch dir: no lock on it
        build(folder, vol, BuildConfig(dtype="float32", max_seq_len=32), progress=False)
        assert load_engine_config(vol).build.max_seq_len == 32 and _generates(vol) == tokens
        assert sorted(p.name for p in vol.iterdir()) == sorted(ENGINE + ["lost+found"])
        # A build that fails leaves the volume as it was: the old engine, no scratch dir.
        with pytest.raises(BuildError, match="tp_size 3"):
            build(folder, vol, BuildConfig(dtype="float32", tp_size=3), progress=False)
        assert load_engine_config(vol).build.max_seq_len == 32
        assert not [p for p in vol.iterdir() if p.name.startswith(PREFIX)]


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def test_build_into_a_bind_mount(llama, tmp_path):
    """A mount point os.path.ismount misses (a bind mount of the same filesystem): the
    rename's EBUSY is caught and the engine moved in, first build and rebuild alike."""
    folder, tokens = llama
    with _bind_mount(tmp_path / "vol") as vol:
        build(folder, vol, F32, progress=False)
        assert _generates(vol) == tokens
        build(folder, vol, BuildConfig(dtype="float32", max_seq_len=32), progress=False)
        assert load_engine_config(vol).build.max_seq_len == 32 and _generates(vol) == tokens
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(PREFIX)]


def test_build_into_a_symlink_to_a_dir(llama, tmp_path):
    """-o a symlink to an empty dir (a disk mounted elsewhere) was an rmtree OSError
    traceback ("Cannot call rmtree on a symbolic link"); the engine goes to its target."""
    folder, tokens = llama
    (tmp_path / "disk").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "disk")
    for max_seq_len in (64, 32):  # a build, then a rebuild
        build(folder, tmp_path / "link", BuildConfig(dtype="float32", max_seq_len=max_seq_len),
              progress=False)
        assert (tmp_path / "link").is_symlink() and is_engine_dir(tmp_path / "disk")
        assert load_engine_config(tmp_path / "disk").build.max_seq_len == max_seq_len
    assert _generates(tmp_path / "link") == tokens


# ---- 2. a full disk ------------------------------------------------------------------------

def _one_line(argv: list[str], capsys) -> str:
    capsys.readouterr()  # what making the checkpoint printed
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("kiln: error: "), err
    return err.strip()


@pytest.mark.parametrize("size", ["4k", "200k"])  # the tokenizer / the weights do not fit
def test_a_full_disk_is_one_line(size, tmp_path, capsys, monkeypatch):
    """ENOSPC was a SafetensorError / OSError traceback (exit 1); the scratch dir goes."""
    from tests.test_eval_summarize import tiny_model_with_tokenizer

    folder = tiny_model_with_tokenizer(tmp_path / "hf")
    with _tmpfs(tmp_path / "small", size) as small:
        line = _one_line(["build", str(folder), "-o", str(small / "e"), "--dtype", "float32"],
                         capsys)
        assert f"no space left on device writing the engine to {small / 'e'}" in line
        assert "needs about" in line and "free there" in line
        assert list(small.iterdir()) == []
        monkeypatch.setenv("KILN_CACHE", str(small / "cache"))  # kiln run's engine cache
        line = _one_line(["run", str(folder), "--prompt", "hi", "--device", "cpu"], capsys)
        assert "no space left on device" in line and "KILN_CACHE" in line
        assert not [p for p in (small / "cache").rglob("*") if p.name.startswith(PREFIX)]


def test_no_space_from_safetensors_is_a_build_error(llama, tmp_path, monkeypatch):
    """Without root (no tmpfs): safetensors' error as a full disk raises it."""
    from safetensors import SafetensorError

    import kiln.build.builder as builder

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(builder, "save_file", full)
    with pytest.raises(BuildError, match="no space left on device writing the engine to "
                       r".*needs about [0-9.]+ MB for its weights"):
        build(llama[0], tmp_path / "e", F32, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(builder, "save_file", lambda *a, **k: (_ for _ in ()).throw(
        SafetensorError("Error while serializing: bad dtype")))
    with pytest.raises(SafetensorError):  # anything else is not taken for a full disk
        build(llama[0], tmp_path / "e", F32, progress=False)


# ---- 3. a damaged tokenizer file -----------------------------------------------------------

@pytest.mark.parametrize("name, text", [("tokenizer.json", "{}"),
                                        ("tokenizer.json", '{"model": '),
                                        ("tokenizer_config.json", "[1, 2]"),
                                        ("tokenizer_config.json", '{"bos_token": ')])
def test_a_damaged_tokenizer_is_refused_at_build(name, text, tmp_path, capsys):
    """tokenizer.json `{}` built, then every kiln run was a traceback from tokenizers
    ("Exception: Model missing.")."""
    from tests.test_eval_summarize import tiny_model_with_tokenizer

    folder = tiny_model_with_tokenizer(tmp_path / "hf")
    (folder / name).write_text(text)
    with pytest.raises(CheckpointError, match=f"{folder / name}: its tokenizer cannot be "
                       "loaded") as e:
        build(folder, tmp_path / "e", F32, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "e").exists()
    line = _one_line(["build", str(folder), "-o", str(tmp_path / "e")], capsys)
    assert f"{folder / name}: its tokenizer cannot be loaded" in line


@pytest.mark.parametrize("name, text", [("tokenizer.json", "{}"),
                                        ("tokenizer.json", b"\xff\xfe"),
                                        ("tokenizer_config.json", "{"),
                                        ("tokenizer_config.json", b'{"a": "\xff"}'),
                                        ("chat_template.json", "[]")])
def test_a_damaged_engine_tokenizer_is_one_line(name, text, tmp_path, capsys):
    from tests.test_eval_summarize import tiny_model_with_tokenizer

    folder = tiny_model_with_tokenizer(tmp_path / "hf")
    engine = build(folder, tmp_path / "e", F32, progress=False)
    path = engine / "tokenizer" / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = _one_line(["run", str(engine), "--prompt", "hi", "--device", "cpu"], capsys)
    assert f"{path} cannot be read (" in line and "rebuild the engine" in line
    with pytest.raises(KilnError, match="the engine's tokenizer file is damaged"):
        LLM(engine, device="cpu")


# ---- 4. YaRN blocks that leave original_max_position_embeddings or factor out --------------

@pytest.mark.parametrize("top, block, scaling", [
    # factor null: max_position_embeddings (256) / original (64), as DeepSeek-V3 has it
    ({}, {"factor": None, "original_max_position_embeddings": 64},
     {"factor": 4.0, "original_max_position_embeddings": 64}),
    # no original: max_position_embeddings
    ({}, {"factor": 4.0}, {"factor": 4.0, "original_max_position_embeddings": 256}),
    # a top-level original (Phi-3's place) wins over the block's, as in transformers
    ({"original_max_position_embeddings": 64},
     {"factor": 4.0, "original_max_position_embeddings": 128},
     {"factor": 4.0, "original_max_position_embeddings": 64}),
], ids=["factor-null", "no-original", "top-level-original"])
def test_yarn_defaults_as_transformers(top, block, scaling, tmp_path):
    """These stopped with a BuildError ("yarn rope scaling needs factor and
    original_max_position_embeddings") or, for a top-level original, used the block's;
    transformers fills them in (standardize_rope_params, _compute_yarn_parameters)."""
    import transformers

    from kiln.model_config import ModelConfig
    from tests.test_rotary_yarn import TOKENS, YARN, _hf_qwen2, _kiln_logits

    _hf_qwen2(tmp_path / "hf", YARN)
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **block}
    config_file.write_text(json.dumps({**config, **top}))
    assert ModelConfig.from_hf({**config, **top}).rope_scaling == {"rope_type": "yarn",
                                                                   **scaling}
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                              dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor([TOKENS])).logits[0]
    got = _kiln_logits(tmp_path / "hf", tmp_path / "engine")
    assert (got - want).abs().max() < 1e-4


def test_yarn_without_factor_is_left_without_one():
    """No factor key at all: transformers' validation refuses it (a KeyError; only a null
    factor is the context ratio), so kiln leaves it out and the build refuses it
    (tests/test_tokenizer_qa45.py)."""
    from kiln.model_config import ModelConfig

    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 100,
              "max_position_embeddings": 8192,
              "rope_scaling": {"type": "yarn", "original_max_position_embeddings": 2048}}
    assert ModelConfig.from_hf(config).rope_scaling == {
        "type": "yarn", "original_max_position_embeddings": 2048}
    config["rope_scaling"]["factor"] = None  # a null one: the ratio
    assert ModelConfig.from_hf(config).rope_scaling["factor"] == 4.0
