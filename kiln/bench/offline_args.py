"""The options of `kiln bench latency | throughput`, and what is checked of them before
anything is built or loaded."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from kiln.bench.report import check_writable
from kiln.cli import SPEC_HELP
from kiln.config import BuildConfig, add_build_arguments, int_in
from kiln.errors import KilnError
from kiln.runtime.scheduler import POLICIES


def add_arguments(p: argparse.ArgumentParser, latency: bool) -> None:
    p.add_argument("model", nargs="?", help="engine dir, HF folder or .gguf (default: SmolLM2)")
    p.add_argument("--random-config", help="build a random-weight engine of this preset "
                   "(e.g. llama-3.1-8b) into the cache and bench it")
    p.add_argument("--input-len", type=int_in(1), default=1000 if latency else 128)
    p.add_argument("--output-len", type=int_in(1), default=128)
    p.add_argument("--num-requests", type=int_in(1), default=1 if latency else 256)
    p.add_argument("--max-batch-size", type=int, default=512)
    p.add_argument("--max-num-tokens", type=int, default=16384)
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel GPUs")
    p.add_argument("--pp-size", type=int, default=1,
                   help="pipeline-parallel stages (x --tp-size GPUs in all)")
    p.add_argument("--pipeline-depth", type=int, default=None,
                   help="pipeline-parallel engines: micro-batches in flight (default: "
                   "--pp-size)")
    p.add_argument("--prefill-graph-tokens", type=int, default=2048, metavar="N",
                   help="a step that only prefills one prompt of up to N tokens replays a "
                   "CUDA graph (0: eager)")
    p.add_argument("--piecewise-graphs", action=argparse.BooleanOptionalAction, default=False,
                   help="steps of up to --prefill-graph-tokens tokens replay CUDA graph "
                   "pieces between their attention calls")
    p.add_argument("--custom-all-reduce", action=argparse.BooleanOptionalAction,
                   default=None, help="TP: kiln's one-shot all-reduce for decode-sized "
                   "messages (default: on where supported; --no-custom-all-reduce: NCCL)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="engine limit (default: input + output length); one value lets "
                   "several runs share one built engine; a built engine serves it as "
                   "`kiln run` does (up to its built one)")
    p.add_argument("--kv-fraction", type=float, default=0.9,
                   help="fraction of free GPU memory for the KV cache")
    p.add_argument("--compare-hf", action="store_true",
                   help="also run transformers generate on the same weights")
    p.add_argument("--hf-batch", type=int_in(1), default=None,
                   help="transformers batch size (default: all requests at once, max 64)")
    p.add_argument("--device", default="auto")
    p.add_argument("--speculative-config", default=None, metavar="JSON", help=SPEC_HELP)
    p.add_argument("--attention-sinks", type=int, default=0, metavar="S",
                   help="StreamingLLM: keep the first S tokens and the last --attention-window")
    p.add_argument("--attention-window", type=int, default=0, metavar="W")
    p.add_argument("--scheduler-policy", default="max_utilization", choices=POLICIES,
                   help="max_utilization: admit while blocks last, preempt (recompute) when "
                   "they run out; guaranteed_no_evict: admit only what can run to its end")
    p.add_argument("--out", default=None, help="JSON result path (a .png plot is written beside)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="profile the measured run: DIR/trace.json (torch profiler, Chrome / "
                   "Perfetto), DIR/ops.txt and a printed table of the ops and kernels that "
                   "took the most time; step phases marked (docs/profiling.md)")
    add_build_arguments(p, limits=False)


def check_args(args: argparse.Namespace) -> None:
    """What `run` can tell is wrong before it builds or loads anything."""
    if args.random_config is not None:
        from kiln.checkpoint.random import PRESETS

        if args.model:
            raise KilnError(f"MODEL ({args.model}) and --random-config conflict: bench either "
                            "a model or random weights of a --random-config preset")

        if args.random_config not in PRESETS:
            raise KilnError(f"unknown --random-config {args.random_config!r}; presets: "
                            + ", ".join(PRESETS))
    if not 0 < args.kv_fraction <= 1:
        raise KilnError(f"--kv-fraction must be in (0, 1] (of the free GPU memory), got "
                        f"{args.kv_fraction}")
    needed = args.input_len + args.output_len
    if args.max_seq_len is not None and (args.max_seq_len < 1 or (
            needed > args.max_seq_len and not args.attention_sinks)):
        raise KilnError(f"--max-seq-len {args.max_seq_len} leaves no room for --input-len "
                        f"{args.input_len} + --output-len {args.output_len} = {needed} tokens")
    check_writable(args.out, "--out")
    check_writable(getattr(args, "profile", None), "--profile", folder=True)


# What random_engine_name does not spell out of the options the weights depend on: a hash
# of those not at their defaults (a calibration text by its contents) ends the name.
_HASHED = ("activation_scheme", "calib_file", "smooth_alpha", "act_order", "calib_samples",
           "calib_seq_len")


def random_engine_name(args: argparse.Namespace, cfg: BuildConfig) -> str:
    """The cache folder of --random-config's engine built with `cfg`."""
    quant = "" if cfg.quantization in ("auto", "none") else f"-{cfg.quantization}"
    quant += f"-g{cfg.group_size}" if cfg.group_size else ""
    head = cfg.quantize_lm_head
    quant += f"-head{'' if head == 'auto' else '-' + head}" if head else ""
    kv = "" if cfg.kv_cache_dtype == "auto" else f"-kv{cfg.kv_cache_dtype}"
    tp = f"-tp{cfg.tp_size}" if cfg.tp_size > 1 else ""
    tp += f"-pp{cfg.pp_size}" if cfg.pp_size > 1 else ""
    tp += "-dummy" if cfg.load_format == "dummy" else ""
    tp += f"-bs{cfg.block_size}" if cfg.block_size != 16 else ""
    default = BuildConfig()
    other = {k: getattr(cfg, k) for k in _HASHED if getattr(cfg, k) != getattr(default, k)}
    if other.get("calib_file"):  # calibrated weights depend on the text, not its name
        from kiln.resolve import _file_identity

        other["calib_file"] = _file_identity(Path(other["calib_file"]))
    key = "-" + hashlib.sha256(json.dumps(other, sort_keys=True).encode()).hexdigest()[:8] \
        if other else ""
    return (f"random-{args.random_config}-{cfg.dtype}{quant}{kv}{tp}-{cfg.max_seq_len}"
            f"{key}")
