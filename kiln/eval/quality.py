"""`kiln eval quality`: perplexity and summaries of one model built in several formats, in
one table against the float engine (JSON + PNG)."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import tempfile
from pathlib import Path
from typing import Any

from kiln.config import DTYPES
from kiln.errors import KilnError

# format name -> BuildConfig fields; dtypes (float32, ...) are formats too. Join with "+"
# to combine: fp8+fp8-kv.
FORMATS: dict[str, dict[str, str]] = {
    "fp8": {"quantization": "fp8"},
    "fp8-kv": {"kv_cache_dtype": "fp8"},
    "int8-kv": {"kv_cache_dtype": "int8"},
}


def parse_formats(spec: str) -> list[tuple[str, dict[str, str]]]:
    """'float32,fp8,fp8+int8-kv' -> [(name, BuildConfig overrides)]."""
    formats = []
    for name in (s.strip() for s in spec.split(",")):
        if not name:
            continue
        overrides: dict[str, str] = {}
        for part in name.split("+"):
            if part in DTYPES:
                overrides["dtype"] = part
            elif part in FORMATS:
                overrides.update(FORMATS[part])
            else:
                raise KilnError(f"--formats: unknown format {part!r} (known: "
                                f"{', '.join(DTYPES + tuple(FORMATS))}; join with '+')")
        formats.append((name, overrides))
    if not formats:
        raise KilnError("--formats names no format")
    return formats


def is_float(overrides: dict[str, str]) -> bool:
    return set(overrides) <= {"dtype"}


def prequantized_source(model: str | None) -> bool:
    """Whether model is a HF folder already quantized (its weights and input scales kept,
    so only KV cache scales are calibrated: kiln.build.quantize.uses_calibration)."""
    from kiln.build.prequantized import quantization_config

    folder = Path(model) if model else None
    if folder is None or not folder.is_dir():
        return False
    try:  # (a damaged file: the build says what is wrong with it)
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    try:
        return quantization_config(folder, config if isinstance(config, dict) else {}) \
            is not None
    except KilnError:
        return False


def run(args: argparse.Namespace, progress: bool = True) -> dict[str, Any]:
    from kiln.build.quantize import uses_calibration
    from kiln.config import build_config_from_args, limits_from_args
    from kiln.eval import check_perplexity_options, read_text, text_perplexity
    from kiln.eval.summarize import evaluate, load_samples, rouge
    from kiln.llm import LLM
    from kiln.resolve import is_engine_dir

    if args.model and is_engine_dir(Path(args.model)):
        raise KilnError("kiln eval quality builds the model once per format: give it the "
                        "source (a HF folder or a .gguf), not a built engine dir")
    check_perplexity_options(args.window, args.max_ppl_tokens, "--max-ppl-tokens")
    if args.max_tokens < 1:
        raise KilnError("--max-tokens must be at least 1")
    formats = parse_formats(args.formats)
    if not any(is_float(o) for _, o in formats):
        formats.insert(0, (args.dtype if args.dtype != "auto" else "float", {}))
    text = read_text(args.file)
    samples = load_samples(args.data, args.max_samples)
    calib_file = args.calib_file
    tmp = None
    if calib_file is None and any(o.get("kv_cache_dtype") == "int8" or args.activation_scheme
                                  == "static" for _, o in formats):
        # Calibrate on the text's second half and measure perplexity on the first.
        tmp = tempfile.TemporaryDirectory(prefix="kiln-calib-")
        half = len(text) // 2
        calib_file = str(Path(tmp.name) / "calib.txt")
        Path(calib_file).write_text(text[half:], encoding="utf-8")
        text = text[:half]
    base = build_config_from_args(args)
    pre = prequantized_source(args.model)
    rows = []
    try:
        for name, overrides in formats:
            cfg = dataclasses.replace(base, **overrides)
            if cfg.kv_cache_dtype == "int8" or cfg.activation_scheme == "static":
                cfg = dataclasses.replace(cfg, calib_file=calib_file)
            if not uses_calibration(cfg.quantization, cfg.activation_scheme,
                                    cfg.kv_cache_dtype, pre):  # the float reference, say
                cfg = dataclasses.replace(cfg, calib_file=None)
            print(f"kiln: format {name}", flush=True)
            llm = LLM(args.model, cfg, device=args.device, **limits_from_args(args))
            ppl, count, window = text_perplexity(llm.engine, text, args.window,
                                                 args.max_ppl_tokens)
            summary = evaluate(llm, samples, args.max_tokens, progress=progress)
            build = llm.engine.config.build
            rows.append({"format": name, "dtype": build.dtype,
                         "quantization": build.quantization,
                         "kv_cache_dtype": build.kv_cache_dtype,
                         "perplexity": ppl, "perplexity_tokens": count, "window": window,
                         "rouge_vs_reference": summary["rouge"].get("kiln_vs_reference"),
                         "summaries": [s["kiln"] for s in summary["samples"]]})
            del llm
            gc.collect()
    finally:
        if tmp is not None:
            tmp.cleanup()
    reference = next(r for r, (_, o) in zip(rows, formats) if is_float(o))
    for row in rows:
        row["perplexity_delta"] = row["perplexity"] - reference["perplexity"]
        row["perplexity_delta_pct"] = 100 * row["perplexity_delta"] / reference["perplexity"]
        row["rougeL_vs_float"] = rouge(row["summaries"], reference["summaries"])["rougeL"]
    return {"model": args.model, "reference_format": reference["format"],
            "calibration": "--calib-file" if args.calib_file else
            ("second half of --file" if calib_file else None),
            "num_samples": len(samples), "max_tokens": args.max_tokens, "formats": rows}


def print_table(result: dict[str, Any]) -> None:
    print(f"\nquality vs {result['reference_format']}: perplexity over "
          f"{result['formats'][0]['perplexity_tokens']} tokens scored, {result['num_samples']} "
          f"summaries of {result['max_tokens']} tokens max")
    print(f"{'format':<16}{'perplexity':>12}{'delta':>10}{'delta %':>9}"
          f"{'ROUGE-L vs float':>18}{'ROUGE-L vs ref':>16}")
    for r in result["formats"]:
        ref = f"{r['rouge_vs_reference']['rougeL']:.4f}" if r["rouge_vs_reference"] else "-"
        print(f"{r['format']:<16}{r['perplexity']:>12.4f}{r['perplexity_delta']:>+10.4f}"
              f"{r['perplexity_delta_pct']:>+8.2f}%{r['rougeL_vs_float']:>18.4f}"
              f"{ref:>16}")


def plot(result: dict[str, Any], path: Path) -> None:
    from kiln.extras import has, missing_extra_message

    if not has("matplotlib"):
        print(f"kiln: no plot: {missing_extra_message('matplotlib')}")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["format"] for r in result["formats"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].bar(names, [r["perplexity_delta_pct"] for r in result["formats"]], color="#c0392b")
    axes[0].set_title(f"perplexity change vs {result['reference_format']} (%)", fontsize=9)
    axes[1].bar(names, [r["rougeL_vs_float"] for r in result["formats"]], color="#7f8c8d")
    axes[1].set_ylim(0, 1.05)
    axes[1].set_title("ROUGE-L of summaries vs the float engine", fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"kiln eval quality: {Path(str(result['model'] or 'default model')).name}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(modes: argparse._SubParsersAction) -> None:
    from kiln.config import add_build_arguments

    p = modes.add_parser("quality", help="perplexity and summary ROUGE per build format")
    p.add_argument("model", nargs="?", help="HF folder or .gguf (default model)")
    p.add_argument("--file", required=True, help="a UTF-8 text file for perplexity")
    p.add_argument("--data", required=True, metavar="FILE.jsonl",
                   help="articles to summarize (as for kiln eval summarize)")
    p.add_argument("--formats", default="float32,fp8,fp8-kv,int8-kv",
                   help="comma-separated: float32|float16|bfloat16, fp8 (weights), fp8-kv, "
                   "int8-kv; '+' combines (fp8+fp8-kv). int8-kv calibrates on --calib-file, "
                   "else on the second half of --file (perplexity then uses the first)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--max-ppl-tokens", type=int, default=None,
                   help="perplexity over the first N tokens only")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=64, help="summary length limit")
    p.add_argument("--out", default=None, help="write the JSON report (and a PNG beside it)")
    p.add_argument("--device", default="auto")
    add_build_arguments(p)
    p.set_defaults(func=_cmd_quality)


def _cmd_quality(args: argparse.Namespace) -> None:
    from kiln.bench.report import check_writable, write_json

    check_writable(args.out, "--out")
    result = run(args)
    print_table(result)
    if args.out:
        out = Path(args.out)
        write_json(out, result)
        plot(result, out.with_suffix(".png"))
        print(f"kiln: wrote {out}")
