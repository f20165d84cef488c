"""What a build quantizes, decided once from the checkpoint and the build options."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.build.calibrate import Stats, calibrate, calibration_samples
from kiln.build.prequantized import Prequantized, gguf_plan, read_quantization
from kiln.checkpoint import Checkpoint
from kiln.config import BuildConfig, ModelConfig
from kiln.distributed import Mapping
from kiln.errors import BuildError
from kiln.layers.quantization import QuantConfig
from kiln.layers.weight_only import INT4_DEFAULT_GROUP

log = logging.getLogger(__name__)


@dataclass
class QuantPlan:
    quant: QuantConfig  # what the engine's linear layers hold
    kv_cache_dtype: str  # auto (the model dtype) | fp8 | int8
    prequantized: Prequantized | None  # the checkpoint's own scheme, if any
    source: str  # "" (float engine), "kiln" (quantized at build), or the format's name
    stats: Stats | None = None  # calibration results, when calibrated

    @property
    def load_quant(self) -> QuantConfig:
        """How the checkpoint's tensors are stored (float unless pre-quantized)."""
        return self.prequantized.quant if self.prequantized else QuantConfig()

    @property
    def load_kv_cache_dtype(self) -> str:
        return self.kv_cache_dtype if self.prequantized else "auto"


def keep_gguf_quantized(asked: str, dtype: str = "auto") -> bool:
    """GGUF sources: whether the build keeps the file's quantized blocks. `auto` keeps
    them where kiln has integer-weight kernels: CUDA (decode reads 4-8x fewer bytes than
    bf16) and a float32 engine on a CPU that runs kiln.kernels.cpu_int (AVX-512F or AVX2, a C
    compiler; decode steps read the integers). Elsewhere the CPU multiplies dequantized
    float32 weights anyway, so `auto` dequantizes at build."""
    if asked != "auto":
        return asked == "gguf"
    if torch.cuda.is_available():
        return True
    from kiln.build.engine_dir import resolve_dtype
    from kiln.kernels import cpu_int

    return resolve_dtype(dtype) == torch.float32 and cpu_int.available()


def plan_quantization(ckpt: Checkpoint, build_cfg: BuildConfig) -> QuantPlan:
    asked = build_cfg.quantization
    gguf_types = getattr(ckpt, "tensor_types", None)
    if asked == "gguf" and gguf_types is None:
        raise BuildError(f"--quantization gguf keeps a GGUF file's quantized blocks; "
                         f"{ckpt.source} is not a GGUF file")
    pre: Prequantized | None = None
    if gguf_types is not None and keep_gguf_quantized(asked, build_cfg.dtype):
        pre = gguf_plan(gguf_types(), keep_head=not torch.cuda.is_available())
        if asked == "auto" and torch.cuda.is_available():  # measured: docs/quantization.md
            log.warning("GGUF blocks kept for the GPU: faster for one stream, decode "
                        "steps slower than bf16 at ~64 concurrent requests (K-quant mixes "
                        "from fewer); --quantization none dequantizes at build where the "
                        "bf16 weights fit")
        if build_cfg.tp_size > 1:  # row-parallel layers split K: whole blocks per rank
            check_group_size(ckpt.config, build_cfg.tp_size, "int8_wo", 32,
                             "GGUF blocks of 32 inputs (whole on each --tp-size rank)",
                             suggest_size=False)
    elif ckpt.hf_config:
        pre = read_quantization(ckpt.source, ckpt.hf_config, ckpt.config,
                                getattr(ckpt, "tensor_names", list)())
    # kiln's default text: for the methods that need calibration (see with_default_calibration)
    calibrated = build_cfg.calib_file is not None or default_calibration(build_cfg, pre)
    if pre is not None:
        if asked not in ("auto", pre.quant.method):
            raise BuildError(f"{ckpt.source} is already quantized ({pre.source}, "
                             f"{pre.quant.method}); build it with --quantization auto "
                             f"(or {pre.quant.method}), not {asked}")
        if build_cfg.activation_scheme not in ("auto", pre.quant.activation_scheme):
            raise BuildError(f"{ckpt.source} has {pre.quant.activation_scheme} FP8 input "
                             "scales; --activation-scheme cannot change that")
        for name, default, _ in METHOD_OPTIONS[:3]:
            if getattr(build_cfg, name) != default:
                raise BuildError(f"{ckpt.source} is already quantized ({pre.source}, "
                                 f"{pre.quant.method}): --{name.replace('_', '-')} applies "
                                 "when kiln quantizes float weights; drop it")
        quant, source = pre.quant, pre.source
    else:
        method = "none" if asked == "auto" else asked
        if asked == "auto":  # (--activation-scheme is left to `kiln eval quality`'s float
            # reference, built with the options of the FP8 formats it is compared with)
            check_options_apply(build_cfg, method, f" (auto: {ckpt.source} holds float "
                                "weights)", ("group_size", "act_order", "smooth_alpha"))
        scheme = build_cfg.activation_scheme
        if scheme == "auto":
            scheme = "static" if calibrated else "dynamic"
        if method == "fp8" and scheme == "static" and not calibrated:
            raise BuildError("--activation-scheme static needs calibration: add "
                             "--calib-file TEXT (any text in the model's language)")
        group = build_cfg.group_size
        if method in INT_WEIGHT_METHODS and group:
            check_group_size(ckpt.config, build_cfg.tp_size, method, group)
        elif method in INT_WEIGHT_METHODS and method.startswith("int4"):
            group = INT4_DEFAULT_GROUP  # (0 also means the default: per channel for int8)
            check_group_size(ckpt.config, build_cfg.tp_size, method, group,
                             f"int4 groups of {group} inputs (the default: --group-size not "
                             "given, or 0)")
        quant = QuantConfig(method, scheme if method == "fp8" else "dynamic",
                            group_size=group if method in INT_WEIGHT_METHODS else 0,
                            lm_head=head_method(build_cfg.quantize_lm_head, method))
        source = "kiln" if method != "none" else ""
    if build_cfg.quantize_lm_head == "gguf":  # engine.json's record of a kept GGUF head
        raise BuildError("--quantize-lm-head takes auto or int8_wo; a GGUF file's quantized "
                         "LM head is kept by --quantization auto / gguf")
    if build_cfg.quantize_lm_head and (pre is not None or quant.method not in HEAD_METHODS):
        held = f"{ckpt.source} holds {pre.source} weights" if pre is not None else \
            f"--quantization {quant.method} has none"
        raise BuildError(f"--quantize-lm-head rounds the LM head with kiln's own methods "
                         f"(--quantization {', '.join(HEAD_METHODS)}); {held}. "
                         "Drop --quantize-lm-head or pick one of those")
    kv = build_cfg.kv_cache_dtype
    if kv == "auto":
        kv = (pre.kv_cache_dtype if pre else None) or "auto"
    if kv == "int8" and not calibrated:
        raise BuildError("--kv-cache-dtype int8 needs per-head scales from calibration: add "
                         "--calib-file TEXT, or use --kv-cache-dtype fp8 (scale 1.0 "
                         "without calibration)")
    if calibrated and not uses_calibration(quant.method, quant.activation_scheme, kv,
                                           pre is not None):
        if pre is not None:
            raise BuildError(f"--calib-file has no effect on {ckpt.source}: it is already "
                             f"quantized ({pre.source}, {quant.method}, its scales stored), "
                             "and calibration would only set fp8/int8 KV cache scales "
                             f"(--kv-cache-dtype {kv} here); drop it")
        raise BuildError(f"--calib-file has no effect with --quantization {quant.method} and "
                         f"--kv-cache-dtype {kv}: calibration sets static FP8 input scales, "
                         f"{'/'.join(CALIBRATED_METHODS)}'s statistics and fp8/int8 KV "
                         "scales; drop it")
    return QuantPlan(quant, kv, pre, source)


def uses_calibration(method: str, activation_scheme: str, kv_cache_dtype: str,
                     prequantized: bool = False) -> bool:
    """Whether calibration text changes an engine of these settings (activation_scheme:
    "auto" counts as static, which calibration makes it). A pre-quantized checkpoint
    keeps its own weights and input scales: only KV cache scales are calibrated."""
    return kv_cache_dtype in ("fp8", "int8") or not prequantized and (
        method in CALIBRATED_METHODS or method == "fp8" and activation_scheme in (
            "static", "auto"))


INT_WEIGHT_METHODS = ("int8_wo", "int4_wo", "int4_awq", "int4_gptq")
HEAD_METHODS = ("fp8", *INT_WEIGHT_METHODS)  # --quantize-lm-head: the head in e4m3 or ints
CALIBRATED_METHODS = ("int8_sq", "int4_awq", "int4_gptq")  # need activation statistics
AWQ_INPUT_ROWS = 256  # input rows per linear layer the AWQ scale search measures on
DEFAULT_CALIBRATION_TEXT = Path(__file__).resolve().parents[1] / "data" / "calibration.txt"


def head_method(asked: str, method: str) -> str:
    """--quantize-lm-head: the head's method (auto: the layers'; int8_wo: int8 per channel,
    what int8_wo layers hold too), "" where the head stays in the model dtype."""
    if not asked or method not in HEAD_METHODS:
        return ""
    return method if asked == "auto" or method == "int8_wo" else asked


def default_calibration(build_cfg: BuildConfig, pre: Prequantized | None) -> bool:
    """Whether the build calibrates on kiln's own text: a method that needs calibration,
    no --calib-file, and float weights (a checkpoint already quantized with it, a W8A8
    one as int8_sq, is calibrated only for an fp8 / int8 KV cache)."""
    return build_cfg.quantization in CALIBRATED_METHODS and not build_cfg.calib_file and (
        pre is None or build_cfg.kv_cache_dtype in ("fp8", "int8"))


def with_default_calibration(build_cfg: BuildConfig, plan: QuantPlan) -> BuildConfig:
    """A method that needs calibration and no --calib-file: kiln's own text."""
    if not default_calibration(build_cfg, plan.prequantized):
        return build_cfg
    if not DEFAULT_CALIBRATION_TEXT.is_file():
        raise BuildError(f"--quantization {build_cfg.quantization} needs calibration text and "
                         f"kiln's default ({DEFAULT_CALIBRATION_TEXT}) is missing from this "
                         "install; add --calib-file TEXT (any text in the model's language)")
    return dataclasses.replace(build_cfg, calib_file=str(DEFAULT_CALIBRATION_TEXT))


def check_group_size(cfg: ModelConfig, tp_size: int, method: str, group: int,
                     named: str | None = None, suggest_size: bool = True) -> None:
    """The group size divides the input size of every linear layer on every rank. named:
    what the group is in the message (default: the --group-size the user gave);
    suggest_size: whether a --group-size would fix it."""
    four = method.startswith("int4")
    kind = f"a positive{' even' if four else ''} number"
    if group < 0 or (four and group % 2):
        raise BuildError(f"{named or f'--group-size {group}'} must be {kind}")
    if not group:
        return
    inputs = {"hidden size (q/k/v, gate/up inputs)": cfg.hidden_size,
              "attention output (o_proj input)": cfg.q_size // tp_size,
              "intermediate size (down_proj input)": cfg.intermediate_size // tp_size}
    for what, size in inputs.items():
        if size % group:
            fits = [g for g in (256, 128, 64, 32, 16)
                    if all(s % g == 0 for s in inputs.values())]
            hint = f"; try --group-size {fits[0]}" if fits else ""
            where = f"the model's {what}, {size}{' per rank' if tp_size > 1 else ''}"
            if named is not None:  # not the user's --group-size
                suggest = f"; give --group-size, {kind} that divides every layer's inputs" \
                    + (f" (e.g. {fits[0]})" if fits else "") if suggest_size else ""
                raise BuildError(f"{named} do not divide {where}{suggest}")
            raise BuildError(f"--group-size {group} does not divide {where}: the group size "
                             f"must be {kind} that divides every layer's inputs{hint}")


# Build options only some methods use: (BuildConfig field, its default (not given), the
# methods it applies to). A value other than the default with another method is refused
# (as TensorRT-LLM's and vLLM's quantization options are): it would change nothing.
METHOD_OPTIONS = (
    ("group_size", 0, INT_WEIGHT_METHODS),
    ("act_order", False, ("int4_gptq",)),
    ("smooth_alpha", 0.5, ("int8_sq",)),
    ("activation_scheme", "auto", ("fp8",)),
)


def check_options_apply(build_cfg: BuildConfig, method: str, why: str = "",
                        fields: tuple[str, ...] = ("group_size", "act_order", "smooth_alpha",
                                                   "activation_scheme")) -> None:
    """The method-specific build options given (not at their defaults) apply to method
    (what --quantization resolved to; why: how, when it was not named)."""
    for name, default, methods in METHOD_OPTIONS:
        value = getattr(build_cfg, name)
        if name in fields and value != default and method not in methods:
            flag = "--" + name.replace("_", "-")
            shown = flag if isinstance(value, bool) else f"{flag} {value}"
            raise BuildError(f"{shown} has no effect with --quantization {method}{why}: it "
                             f"applies to {', '.join(methods)}; drop it or pick one of those")


def calibrate_checkpoint(ckpt: Checkpoint, build_cfg: BuildConfig, plan: QuantPlan,
                         dtype: torch.dtype, progress: bool,
                         load: Callable[[Mapping], torch.nn.Module]) -> Stats:
    """Ranges of the whole model (one rank) over the calibration text."""
    samples = calibration_samples(ckpt, build_cfg.calib_file, build_cfg.calib_samples,
                                  min(build_cfg.calib_seq_len, build_cfg.max_seq_len),
                                  ckpt.config.vocab_size)
    model = load(Mapping())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = plan.quant.method
    stats = Stats(hessians=method == "int4_gptq",
                  input_rows=AWQ_INPUT_ROWS if method == "int4_awq" else 0)
    try:
        return calibrate(model, samples, device, progress, stats=stats)
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def apply_calibrated_method(model: torch.nn.Module, plan: QuantPlan, build_cfg: BuildConfig,
                            mapping: Mapping, progress: bool) -> None:
    """Before the layers are rounded: SmoothQuant / AWQ scales folded in, or GPTQ's
    rounding done (its layers are then left alone by quantize_float_model)."""
    stats, method = plan.stats, plan.quant.method
    assert stats is not None
    if method == "int8_sq":
        from kiln.build.smoothquant import smooth_model

        smooth_model(model, stats.channel_amax, build_cfg.smooth_alpha, mapping)
    elif method == "int4_awq":
        from kiln.build.awq import awq_model

        awq_model(model, stats.inputs, plan.quant.group_size, mapping, progress)
    elif method == "int4_gptq":
        from kiln.build.gptq import gptq_model

        gptq_model(model, plan.quant, stats.hessian, mapping, build_cfg.act_order, progress)
