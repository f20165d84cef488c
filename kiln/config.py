"""Frozen configs: how an engine was built (BuildConfig), what engine.json holds
(EngineConfig), and the build options of the command line. The model side (ModelConfig,
the architecture table) is kiln.model_config, re-exported here."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, NoReturn

from kiln.model_config import (  # noqa: F401  (re-exported)
    ACTIVATIONS,
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
)

DTYPES = ("float32", "float16", "bfloat16")
# auto: what the checkpoint holds (none for floats)
QUANTIZATIONS = ("auto", "none", "fp8", "int8_wo", "int4_wo", "int4_awq", "int4_gptq", "int8_sq",
                 "gguf")
KV_CACHE_DTYPES = ("auto", "fp8", "int8")  # auto: the checkpoint's KV scheme, else dtype
ACTIVATION_SCHEMES = ("auto", "dynamic", "static")  # auto: static when calibrated
LM_HEAD_QUANTIZATIONS = ("auto", "int8_wo")  # --quantize-lm-head: the layers' method, or int8
# stored: the weights in the engine dir; dummy: none stored, random values filled in on the
# device at load (speed measurements of models bigger than the disk, as vLLM's "dummy")
LOAD_FORMATS = ("stored", "dummy")
DUMMY_QUANTIZATIONS = ("auto", "none", "fp8", "int8_wo", "int4_wo")  # no calibration


@dataclass(frozen=True)
class BuildConfig:
    """How an engine is built. Stored in engine.json; the runtime reads its limits."""

    dtype: str = "auto"  # auto: bfloat16 where CUDA is available, else float32
    max_batch_size: int = 64
    max_seq_len: int = 4096
    max_num_tokens: int = 8192  # token budget of one engine step
    kv_cache_dtype: str = "auto"  # see KV_CACHE_DTYPES; a built engine stores the resolved one
    block_size: int = 16  # tokens per KV cache block
    tp_size: int = 1
    pp_size: int = 1
    random_weights: bool = False
    load_format: str = "stored"  # see LOAD_FORMATS
    # Quantization (see kiln.layers.quantization). A built engine records what it holds:
    # the method, how activations are scaled, and the linear layers kept in high precision.
    quantization: str = "auto"
    activation_scheme: str = "auto"  # fp8 inputs: dynamic per token or static per tensor
    quant_ignore: tuple[str, ...] = ()  # kiln module names left unquantized
    quant_source: str = ""  # where the quantized weights came from (kiln, a format name)
    calib_file: str | None = None  # text for static activation and KV scales
    group_size: int = 0  # integer weights: inputs per scale (0: int4 128, int8 per channel)
    quant_layers: dict[str, str] = field(default_factory=dict)  # gguf: storage per layer
    smooth_alpha: float = 0.5  # int8_sq: SmoothQuant migration strength
    act_order: bool = False  # int4_gptq: columns in order of decreasing activation energy
    # the LM head quantized too (RTN): "" no, "auto" the layers' weight-only method,
    # "int8_wo" int8 per channel under any of them; a built engine records the method
    quantize_lm_head: str = ""
    calib_samples: int = 32
    calib_seq_len: int = 512

    @property
    def quantized(self) -> bool:
        return self.quantization not in ("auto", "none")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["quant_ignore"] = tuple(data.get("quant_ignore", ()))
        return cls(**data)


@dataclass(frozen=True)
class EngineConfig:
    """What `engine.json` holds: the model, how it was built, and where it came from."""

    model: ModelConfig
    build: BuildConfig
    source: dict[str, Any] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)
    format_version: int = 1


def int_in(low: int, high: int | None = None, what: str = "a whole number"
           ) -> Any:
    """An argparse type: a whole number in [low, high] (no upper bound without high)."""
    bounds = f">= {low}" if high is None else f"({low}-{high})"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {text!r}")
        return value

    return parse


class OneLineParser(argparse.ArgumentParser):
    """kiln's command-line parsers: a bad option (`--port abc`, `--output-len 0`, an unknown
    one) is one line, `kiln: error: ...` with exit code 2, as kiln's other mistakes are,
    rather than the command's whole usage and then the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"kiln: error: {message} (see {self.prog} --help)\n")


def add_build_arguments(p: argparse.ArgumentParser, limits: bool = True,
                        runtime: bool = True) -> None:
    """The build options of `kiln build | run | serve | bench | eval` (limits: the
    engine-size options, which bench sets itself; runtime: with limits, the options only
    a loaded engine uses, which `kiln build` does not offer: they would change nothing)."""
    g = p.add_argument_group("build options")
    g.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on GPU, float32 on CPU), float32, float16, bfloat16")
    if limits:
        # Limits are runtime settings of a built engine (its built max_seq_len is the most
        # it serves); given here they also size an engine built into the cache.
        g.add_argument("--max-batch-size", type=int, default=None,
                       help="sequences per step (default: the engine's, 64 for new builds)")
        g.add_argument("--max-seq-len", type=int, default=None,
                       help="prompt + output tokens (default: the engine's; for new builds "
                       "4096, or the model's trained positions where fewer)")
        g.add_argument("--max-num-tokens", type=int, default=None,
                       help="token budget of one engine step (default: the engine's, 8192)")
        g.add_argument("--tp-size", type=int, default=1)
        g.add_argument("--pp-size", type=int, default=1)
    if limits and runtime:
        g.add_argument("--custom-all-reduce", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="TP on CUDA: all-reduce decode-sized messages with kiln's "
                       "one-shot NVLink kernel (fused with add + RMSNorm) instead of NCCL "
                       "(default: on where the GPUs support it)")
        g.add_argument("--prefill-graph-tokens", type=int, default=None, metavar="N",
                       help="CUDA: a step that only prefills one prompt of up to N tokens "
                       "replays a CUDA graph (default 2048; 0: eager, less memory and load "
                       "time)")
        g.add_argument("--attention-sinks", type=int, default=None, metavar="S",
                       help="StreamingLLM: keep each sequence's first S tokens (whole KV "
                       "blocks) and its last --attention-window tokens, so generation runs "
                       "past --max-seq-len in constant memory (RoPE models)")
        g.add_argument("--attention-window", type=int, default=None, metavar="W",
                       help="with --attention-sinks: recent tokens kept (default: what "
                       "max_seq_len leaves after the sinks and one block)")
    g.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                   help="fp8: W8A8 FP8 weights and activations; int8_wo / int4_wo: INT8 "
                   "(per channel) / INT4 (groups, with offsets) weights, 16-bit "
                   "activations; int4_awq / int4_gptq: INT4 storage, AWQ scale search / "
                   "GPTQ rounding on calibration text; int8_sq: SmoothQuant INT8 weights "
                   "and per-token INT8 activations (calibrated); auto: what the checkpoint "
                   "holds (FP8 compressed-tensors / modelopt checkpoints stay FP8; GGUF "
                   "files keep their quantized blocks on CUDA, and are dequantized on the "
                   "CPU); gguf / none: keep / dequantize a GGUF file's blocks")
    g.add_argument("--group-size", type=int, default=None,
                   help="integer weights: inputs sharing one scale; it must divide every "
                   "layer's input size (default: 128 for int4, per channel for int8)")
    g.add_argument("--block-size", type=int, default=None, metavar="TOKENS",
                   help="tokens per KV cache block, a power of two from 8 to 256 (default "
                   "16; on Hopper, 64 or 128 let the prefill kernel read whole tiles by "
                   "TMA: long prompts with a 16-bit cache; prefix caching shares whole "
                   "blocks)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="fp8 or int8: 1-byte KV cache with per-head scales (int8 needs "
                   "--calib-file); auto: the checkpoint's KV scheme, else --dtype")
    g.add_argument("--activation-scheme", default="auto", choices=ACTIVATION_SCHEMES,
                   help="FP8 inputs: dynamic per token, or static per tensor from "
                   "calibration (auto: static when --calib-file is given)")
    g.add_argument("--calib-file", default=None, metavar="TEXT",
                   help="text to calibrate static input scales, KV scales and SmoothQuant on "
                   "(int8_sq without it: a public-domain text that ships with kiln)")
    g.add_argument("--smooth-alpha", type=float, default=None,
                   help="int8_sq: how much of the activation range SmoothQuant moves into "
                   "the weights, 0..1 (default 0.5)")
    g.add_argument("--act-order", action="store_true", default=None,
                   help="int4_gptq: round the most used input channels first")
    g.add_argument("--quantize-lm-head", nargs="?", const="auto", default=None,
                   choices=LM_HEAD_QUANTIZATIONS, metavar="{int8_wo}",
                   help="with fp8 / int8_wo / int4_wo / int4_awq / int4_gptq: quantize the "
                   "LM head too, rounded to nearest, in the layers' storage (fp8: e4m3 per "
                   "row, its input per token; or int8 per channel: --quantize-lm-head "
                   "int8_wo); by default it stays in the model dtype. A Llama-3-8B head is "
                   "1 GB in bf16, read every decode step")
    g.add_argument("--calib-samples", type=int, default=32)
    g.add_argument("--calib-seq-len", type=int, default=512)
    g.add_argument("--load-format", default=None, choices=LOAD_FORMATS,
                   help="dummy: store no weights; each rank fills its own with random values "
                   "on the device at load, quantized as built (speed tests of models bigger "
                   "than the disk: Llama-3.1-70B, 405B)")


LIMITS = ("max_batch_size", "max_num_tokens", "max_seq_len")
# What an engine's weights depend on: fixed by its build, not changeable when it is loaded.
WEIGHT_OPTIONS = ("dtype", "quantization", "kv_cache_dtype", "tp_size", "pp_size",
                  "block_size", "group_size", "activation_scheme", "quantize_lm_head",
                  "smooth_alpha", "act_order", "calib_file", "load_format")
_CHOICES = (("dtype", ("auto", *DTYPES)), ("quantization", QUANTIZATIONS),
            ("kv_cache_dtype", KV_CACHE_DTYPES), ("activation_scheme", ACTIVATION_SCHEMES),
            ("load_format", LOAD_FORMATS),
            ("quantize_lm_head", ("", *LM_HEAD_QUANTIZATIONS, "gguf")))  # gguf: recorded only


# The numeric build options and the type each takes (a float option takes an int too).
_NUMBERS = {f.name: getattr(f.type, "__name__", f.type)
            for f in dataclasses.fields(BuildConfig) if f.type in ("int", "float", int, float)}


def check_choices(build: BuildConfig) -> None:
    """The build options that name one of a set of values, and the numeric ones' types
    (LLM(..., group_size="32") is one line, not a TypeError deep in the build), checked
    before anything is opened or built (the model-dependent checks are
    kiln.build.builder.validate's)."""
    from kiln.errors import BuildError

    for name, allowed in _CHOICES:
        if getattr(build, name) not in allowed:
            raise BuildError(f"--{name.replace('_', '-')} {getattr(build, name)!r} is not "
                             f"one of: {', '.join(allowed)}")
    for name, kind in _NUMBERS.items():
        value = getattr(build, name)
        if isinstance(value, bool) or not isinstance(value, int if kind == "int"
                                                     else (int, float)):
            what = "a whole number" if kind == "int" else "a number"
            raise BuildError(f"--{name.replace('_', '-')} ({name}) must be {what}, got "
                             f"{value!r} ({type(value).__name__})")


def build_config_from_args(args: argparse.Namespace, **overrides: Any) -> BuildConfig:
    """A BuildConfig from the options add_build_arguments added (and `overrides`)."""
    names = {f.name for f in dataclasses.fields(BuildConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return BuildConfig(**{**values, **overrides})


def limits_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The runtime limits and options given on the command line (engine defaults for the
    rest)."""
    options: dict[str, Any] = {k: getattr(args, k) for k in LIMITS
                               if getattr(args, k, None) is not None}
    for name in ("custom_all_reduce", "attention_sinks", "attention_window",
                 "prefill_graph_tokens"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options
