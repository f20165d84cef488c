"""Turn a checkpoint into an engine dir: map names, fuse, shard per rank, cast, write."""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from kiln.build import scratch as scratches
from kiln.build.engine_dir import (
    ENGINE_JSON,
    is_engine_dir,
    rank_file,
    resolve_dtype,
    write_engine_config,
)
from kiln.build.memory import check_fits, rank_bytes
from kiln.build.quantize import (
    QuantPlan,
    apply_calibrated_method,
    calibrate_checkpoint,
    check_options_apply,
    plan_quantization,
    with_default_calibration,
)
from kiln.build.scratch import make_scratch, release, terminate_unwinds
from kiln.checkpoint import Checkpoint, open_checkpoint
from kiln.config import (
    ACTIVATIONS,
    DUMMY_QUANTIZATIONS,
    BuildConfig,
    EngineConfig,
    ModelConfig,
    check_choices,
)
from kiln.distributed import Mapping
from kiln.errors import BuildError, CheckpointError
from kiln.layers.quantization import quantize_float_model
from kiln.models import check_model, create_model
from kiln.tokenizer import Tokenizer, TokenizerFileError

log = logging.getLogger(__name__)
DEFAULT_MAX_SEQ_LEN = BuildConfig.max_seq_len  # "not given" (planned_max_seq_len)


def validate(cfg: ModelConfig, build_cfg: BuildConfig) -> None:
    """Everything a user can get wrong about a build, checked before any work starts."""
    check_choices(build_cfg)
    if build_cfg.load_format == "dummy" and (
            build_cfg.quantization not in DUMMY_QUANTIZATIONS or build_cfg.calib_file
            or build_cfg.activation_scheme == "static" or build_cfg.kv_cache_dtype == "int8"):
        raise BuildError("--load-format dummy stores no weights, so nothing can be calibrated: "
                         "it takes --quantization none, fp8, int8_wo or int4_wo and "
                         "--kv-cache-dtype auto or fp8, without --calib-file")
    for name in ("max_batch_size", "max_seq_len", "max_num_tokens", "block_size",
                 "tp_size", "pp_size", "calib_samples", "calib_seq_len"):
        if getattr(build_cfg, name) < 1:
            raise BuildError(f"{name} must be at least 1, got {getattr(build_cfg, name)}")
    if build_cfg.block_size & (build_cfg.block_size - 1) or not 8 <= build_cfg.block_size <= 256:
        raise BuildError(f"--block-size {build_cfg.block_size}: tokens per KV cache block must "
                         "be a power of two from 8 to 256 (16 by default)")
    if not 0 <= build_cfg.smooth_alpha <= 1:
        raise BuildError(f"--smooth-alpha {build_cfg.smooth_alpha}: the share of the activation "
                         "range SmoothQuant moves into the weights must be in [0, 1] (0.5 by "
                         "default)")
    if build_cfg.group_size < 0:
        raise BuildError(f"--group-size {build_cfg.group_size} must be a positive number")
    if build_cfg.quantization != "auto":  # auto: plan_quantization, once it is resolved
        check_options_apply(build_cfg, build_cfg.quantization)
    if build_cfg.calib_file is not None and not Path(build_cfg.calib_file).expanduser().is_file():
        raise BuildError(f"calibration file {build_cfg.calib_file} does not exist")
    tp = build_cfg.tp_size
    for what, n in (("attention heads", cfg.num_heads),
                    ("intermediate size", cfg.intermediate_size),
                    ("expert intermediate size", cfg.moe_intermediate_size),
                    ("shared expert intermediate size", cfg.shared_expert_intermediate_size)):
        if n % tp:
            raise BuildError(f"tp_size {tp} does not divide the model's {what} ({n})")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise BuildError(f"tp_size {tp} and the model's {cfg.num_kv_heads} KV heads: one must "
                         "divide the other (fewer KV heads than ranks are replicated)")
    if build_cfg.pp_size > cfg.num_layers:
        raise BuildError(f"pp_size {build_cfg.pp_size} exceeds the {cfg.num_layers} layers")
    if cfg.hidden_act not in ACTIVATIONS:
        raise BuildError(f"activation {cfg.hidden_act!r} is not supported "
                         f"(supported: {', '.join(ACTIVATIONS)})")
    check_model(cfg)


def build(source: str | Path | Checkpoint, output_dir: str | Path,
          build_cfg: BuildConfig | None = None, progress: bool = True) -> Path:
    """Build `source` (HF folder, GGUF file or an opened Checkpoint) into `output_dir`
    (max_seq_len: see planned_max_seq_len)."""
    build_cfg = build_cfg or BuildConfig()
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    validate(ckpt.config, build_cfg)
    positions = ckpt.config.max_position_embeddings
    max_seq_len = planned_max_seq_len(ckpt.config, build_cfg)
    if max_seq_len != build_cfg.max_seq_len:
        if build_cfg.max_seq_len != DEFAULT_MAX_SEQ_LEN:  # asked for: learned positions cap it
            log.warning("max_seq_len %d capped to the %d positions %s has learned",
                        build_cfg.max_seq_len, positions, ckpt.config.architecture)
        build_cfg = dataclasses.replace(build_cfg, max_seq_len=max_seq_len)
    dtype = resolve_dtype(build_cfg.dtype)
    plan = plan_quantization(ckpt, build_cfg)
    build_cfg = with_default_calibration(build_cfg, plan)
    build_cfg = dataclasses.replace(
        build_cfg, dtype=str(dtype).removeprefix("torch."), quantization=plan.quant.method,
        activation_scheme=plan.quant.activation_scheme, quant_ignore=plan.quant.ignore,
        group_size=plan.quant.group_size, quant_layers=dict(plan.quant.layers),
        quant_source=plan.source, kv_cache_dtype=plan.kv_cache_dtype,
        quantize_lm_head=plan.quant.lm_head)
    if build_cfg.load_format == "dummy" and build_cfg.quantization not in DUMMY_QUANTIZATIONS:
        raise BuildError(f"--load-format dummy cannot hold {build_cfg.quantization} weights "
                         f"(what {ckpt.source} holds); add --quantization none, fp8, int8_wo "
                         "or int4_wo")
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, ckpt.source)
    if build_cfg.max_seq_len > positions:  # runs (rotary has no table end), unreliably
        log.warning("max_seq_len %d is past the %d positions %s was trained on: outputs past "
                    "them are unreliable", build_cfg.max_seq_len, positions,
                    ckpt.config.architecture)
    if build_cfg.load_format == "stored":  # before any work: the OOM killer says nothing
        check_fits(rank_bytes(ckpt.config, build_cfg, dtype, plan.load_quant,
                              plan.load_kv_cache_dtype), dtype, build_cfg, ckpt.source)
    # Write into a scratch dir and rename at the end: a half-built engine never exists.
    # Killed builds leave it behind (`kiln cache list | clear` finds it: its lock is gone).
    # A dir that cannot be replaced (a mount point: a Docker volume) gets the scratch dir
    # inside it, and the engine's files are moved out of it, engine.json last.
    in_place = scratches.in_place(output_dir)
    for path in scratches.leftovers(output_dir) if in_place else ():  # killed builds'
        scratches.remove_leftover(path)
    with terminate_unwinds():  # SIGTERM cleans up as Ctrl-C does
        scratch, lock = make_scratch(output_dir / ENGINE_JSON if in_place else output_dir)
        try:
            _write_engine(scratch, ckpt, build_cfg, plan, dtype, progress)
            if in_place or not scratches.replace(output_dir, scratch):
                held, lock = lock, None
                release(held)  # gives the files their modes (see scratch) while still there
                scratches.move_into(scratch, output_dir)
        except Exception as e:
            if not _no_space(e):
                raise
            shutil.rmtree(scratch, ignore_errors=True)  # then what is free can be told
            raise BuildError(_no_space_message(output_dir, ckpt, build_cfg, plan, dtype)
                             ) from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            release(lock)
    return output_dir


def _no_space(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, as an OSError or in the text of safetensors' or tokenizers' error."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return any(f"(os error {n})" in str(e) for n in (errno.ENOSPC, errno.EDQUOT))


def _no_space_message(output_dir: Path, ckpt: Checkpoint, build_cfg: BuildConfig,
                      plan: QuantPlan, dtype: torch.dtype) -> str:
    needs = build_cfg.tp_size * build_cfg.pp_size * rank_bytes(
        ckpt.config, build_cfg, dtype, plan.quant, plan.kv_cache_dtype) \
        if build_cfg.load_format == "stored" else 0  # dummy: no weights stored
    where = next((p for p in (output_dir, *output_dir.parents) if p.exists()), output_dir)
    try:
        free = f", {_size(shutil.disk_usage(where).free)} free there"
    except OSError:
        free = ""
    return (f"no space left on device writing the engine to {output_dir} (it needs about "
            f"{_size(needs)} for its weights{free}); free some space, or build it elsewhere "
            "(kiln build -o DIR; KILN_CACHE=DIR for the engines kiln run builds)")


def _size(n: float) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e9 else f"{n / 1e6:.3g} MB"


def _write_engine(scratch: Path, ckpt: Checkpoint, build_cfg: BuildConfig, plan: QuantPlan,
                  dtype: torch.dtype, progress: bool) -> None:
    started = time.perf_counter()
    has_tokenizer = ckpt.write_tokenizer(scratch / "tokenizer")
    if has_tokenizer:
        _check_tokenizer_fits(scratch / "tokenizer", ckpt)
    else:
        log.warning("%s: the engine will take token ids only, not text prompts",
                    getattr(ckpt, "no_tokenizer_reason", None) or f"{ckpt.source} has no "
                    "tokenizer files (tokenizer.json or tokenizer.model)")
    if build_cfg.load_format == "dummy":
        log.info("load format dummy: no weights stored (random ones filled in at load)")
    elif build_cfg.calib_file:
        plan.stats = calibrate_checkpoint(ckpt, build_cfg, plan, dtype, progress,
                                          lambda m: load_model(ckpt, build_cfg, m, dtype,
                                                               plan, progress))
    world = build_cfg.tp_size * build_cfg.pp_size
    for rank in range(world if build_cfg.load_format == "stored" else 0):
        mapping = Mapping(world, rank, build_cfg.tp_size, build_cfg.pp_size)
        state = convert_rank(ckpt, build_cfg, mapping, dtype, progress, plan)
        save_file(state, str(rank_file(scratch, rank)), metadata={"format": "pt"})
        del state  # and the model's reference cycles: one rank in memory at a time
        gc.collect()  # (a TP2 1B bf16 build held both ranks: 2.86 GB peak, now 1.65)
    # Absolute: `kiln cache list` shows where an engine came from, from any directory.
    where = ckpt.source.resolve() if ckpt.source.exists() else ckpt.source
    write_engine_config(scratch, EngineConfig(
        model=ckpt.config, build=build_cfg,
        source={"path": str(where), "fingerprint": ckpt.fingerprint(),
                "has_tokenizer": has_tokenizer,
                "build_seconds": round(time.perf_counter() - started, 2)},
    ))


def planned_max_seq_len(cfg: ModelConfig, build_cfg: BuildConfig) -> int:
    """The max_seq_len `build` gives an engine of `cfg`. BuildConfig's default (4096) counts
    as not given: the model's trained positions where they are fewer. A value asked for
    past them is kept (with a warning), except that learned positions (GPT-2) cap any
    value to their table: the model has no position past it."""
    asked, positions = build_cfg.max_seq_len, cfg.max_position_embeddings
    if 0 < positions < asked and (asked == DEFAULT_MAX_SEQ_LEN
                                  or cfg.position_embedding == "learned"):
        return positions
    return asked


def _check_output_dir(output_dir: Path, source: Path) -> None:
    """A rebuild replaces an engine dir; anything else that exists is the user's data."""
    if output_dir.exists() and output_dir.resolve() == source.resolve():
        raise BuildError(f"the output {output_dir} is the source checkpoint; choose another -o")
    if output_dir.is_file() or (output_dir.is_dir() and not is_engine_dir(output_dir)
                                and not all(map(scratches.kept, output_dir.iterdir()))):
        raise BuildError(f"{output_dir} exists and is not a kiln engine dir; choose an empty "
                         "or new directory for -o")


def _check_tokenizer_fits(folder: Path, ckpt: Checkpoint) -> None:
    """The tokenizer written into folder loads (a damaged file is refused, the source's
    named), and every id of it has a row in the model's embedding (a vocab_size larger
    than the tokenizer's, padding, is fine)."""
    try:
        Tokenizer(folder)
    except TokenizerFileError as e:
        src = ckpt.source / e.path.name
        raise CheckpointError(f"{src if src.is_file() else ckpt.source}: its tokenizer cannot "
                              f"be loaded ({e.why}); is the file damaged? re-download or "
                              "re-export it") from None
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = data["model"].get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        ids += [t["id"] for t in data.get("added_tokens") or ()]
        size = max(ids, default=-1) + 1
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # a tokenizer this does not read: its loader says what is wrong
    if size > ckpt.config.vocab_size:
        raise BuildError(
            f"{ckpt.source}: the tokenizer has {size} tokens but the model's vocab_size is "
            f"{ckpt.config.vocab_size}, so text would encode to ids the model has no "
            "embedding for; does the tokenizer belong to these weights?")


def convert_rank(ckpt: Checkpoint, build_cfg: BuildConfig, mapping: Mapping,
                 dtype: torch.dtype, progress: bool, plan: QuantPlan | None = None
                 ) -> dict[str, torch.Tensor]:
    """This rank's engine tensors: loaded, fused, sharded, then quantized as planned."""
    plan = plan or plan_quantization(ckpt, build_cfg)
    model = load_model(ckpt, build_cfg, mapping, dtype, plan, progress)
    stats = plan.stats
    if plan.prequantized is None:
        if stats is not None:  # SmoothQuant / AWQ scales, GPTQ rounding
            apply_calibrated_method(model, plan, build_cfg, mapping, progress)
        quantize_float_model(model, plan.quant, plan.kv_cache_dtype,
                             stats.input_amax if stats else {}, stats.kv_amax if stats else {})
    elif stats is not None:  # calibrated KV scales replace the checkpoint's
        quantize_float_model(model, plan.load_quant, plan.kv_cache_dtype, {},
                             stats.kv_amax)
    return {k: v.contiguous() for k, v in model.engine_state_dict().items()}


def load_model(ckpt: Checkpoint, build_cfg: BuildConfig, mapping: Mapping,
               dtype: torch.dtype, plan: QuantPlan, progress: bool) -> torch.nn.Module:
    """A model holding this rank's slice of every checkpoint tensor, as stored."""
    model = create_model(ckpt.config, mapping, build_cfg.max_seq_len, dtype,
                         quant=plan.load_quant, kv_cache_dtype=plan.load_kv_cache_dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    unused: list[str] = []
    desc = f"converting rank {mapping.rank}" if mapping.world_size > 1 else "converting"
    stream = ckpt.tensors() if plan.prequantized is None else plan.prequantized.stream(ckpt)
    stream = (pair for name, tensor in stream for pair in model.split_fused(name, tensor))
    # Each tensor checked once, by the first TP rank of the pipeline stage that holds it.
    check = mapping.tp_rank == 0 and not ckpt.synthetic_values
    for hf_name, tensor in tqdm(stream, total=ckpt.num_tensors(), desc=desc,
                                unit="tensor", disable=None if progress else True, leave=False):
        target = model.weight_target(hf_name)
        if target is None:
            continue
        name, shard = target
        if name not in params:  # transformers too loads past tensors it has no place for
            unused.append(hf_name)
            continue
        param = params[name]
        if check:
            _check_values(hf_name, tensor, param, plan.prequantized is None)
        try:
            model.loader_for(param)(param, tensor, shard)
        except ValueError as e:
            raise CheckpointError(f"tensor {hf_name!r} does not match the config: {e}") from None
        loaded.add(name if shard is None else f"{name}:{shard}")
    origins = getattr(ckpt, "origins", {})
    unused_text = ", ".join(f"{n} ({origins[n]})" if n in origins else n for n in unused[:3]) \
        + (" ..." if len(unused) > 3 else "")
    pre = plan.prequantized  # (calibration replaces the checkpoint's KV scales)
    kv_scales = "optional" if pre is None or build_cfg.calib_file else \
        "all" if pre.kv_scales_required else "all or none"
    _check_complete(model, params, loaded, getattr(ckpt, "weight_files", ()),
                    f"; it holds {len(unused)} tensor(s) a {ckpt.config.architecture} model "
                    f"has no place for ({unused_text}): does config.json describe this "
                    "checkpoint?" if unused else "", kv_scales)
    if unused and mapping.rank == 0:
        log.warning("the checkpoint holds %d tensor(s) a %s model does not use, ignored: %s",
                    len(unused), ckpt.config.architecture, unused_text)
    return model


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CODES = (torch.float8_e4m3fn, torch.int8)  # quantized weights' parameter dtypes


def _check_values(hf_name: str, tensor: torch.Tensor, param: torch.nn.Parameter,
                  unquantized: bool) -> None:
    """What a checkpoint tensor cannot hold: NaN / Inf (one min/max pass, as it is loaded),
    or, in a checkpoint without quantization_config, integers / FP8 where the parameter
    takes float weights (they would be cast silently; a quantized format's loaders say
    what they take); in a quantized one, floats that are not the FP8 / int8 codes the
    parameter holds."""
    if unquantized and param.dtype in _FLOATS and tensor.dtype not in _FLOATS:
        raise CheckpointError(
            f"checkpoint tensor {hf_name!r} is {str(tensor.dtype).removeprefix('torch.')} "
            "where kiln expects float weights, and config.json has no quantization_config "
            "saying how to read it; is it from a quantized export whose config was lost?")
    if not unquantized and param.dtype in _CODES and tensor.dtype in _FLOATS and \
            not torch.equal(tensor.to(param.dtype).to(tensor.dtype), tensor):  # (codes
        # stored as floats load as they are; kiln's own methods quantize float weights)
        raise CheckpointError(
            f"checkpoint tensor {hf_name!r} is {str(tensor.dtype).removeprefix('torch.')} with "
            f"values that are not {str(param.dtype).removeprefix('torch.')} codes, where the "
            "checkpoint's quantization_config stores quantized weights; re-export it")
    if tensor.dtype in _FLOATS and tensor.numel():
        low, high = torch.aminmax(tensor)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            raise CheckpointError(
                f"checkpoint tensor {hf_name!r} holds {nan} NaN and {inf} infinite value(s) "
                f"of {tensor.numel()}: the file is corrupt, or the model diverged in "
                "training; re-download or re-export it")


def _check_complete(model: torch.nn.Module, params: dict[str, torch.nn.Parameter],
                    loaded: set[str], files: Sequence[str], hint: str,
                    kv_scales: str = "optional") -> None:
    """Every parameter loaded. The KV scales (optional parameters, 1.0 until loaded):
    kv_scales "optional" (kiln's own fp8 KV without calibration), "all" (a checkpoint
    whose kv_cache_scheme declares them) or "all or none" (any other pre-quantized one:
    modelopt's fp8_cast stores none)."""
    expected, optional = set(), set()
    for name in model.engine_state_dict():
        param = params[name]
        if getattr(param, "optional", False):
            optional.add(name)
            continue
        shard_ids = getattr(param, "shard_ids", None)
        expected |= {f"{name}:{s}" for s in shard_ids} if shard_ids else {name}
    if kv_scales == "all" or (kv_scales == "all or none" and optional & loaded):
        expected |= optional
        if optional - loaded:
            hint += ("; its kv_cache_scheme needs every attention layer's k_scale and v_scale"
                     if kv_scales == "all" else "; it holds the KV cache scales of some "
                     "attention layers only") + ": is the export incomplete?"
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        read = f" (it read {', '.join(files)})" if files else ""
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shown}{read}"
                              + hint)
