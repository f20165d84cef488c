"""`kiln bench latency` and `kiln bench throughput`: the engine in-process, optionally
side by side with HuggingFace transformers' `generate` on the very same weights."""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kiln.bench.offline_args import add_arguments, check_args, random_engine_name
from kiln.bench.report import step_kinds, summarize, write_json
from kiln.bench.roofline import (
    decode_bytes_per_token,
    measured_copy_bandwidth,
    measured_gemm_rate,
    throughput_floor,
)
from kiln.errors import KilnError
from kiln.runtime.cuda_graphs import describe_routes
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.heap import CollectionWatch, freeze_startup_heap
from kiln.runtime.profiling import CompileWatch
from kiln.runtime.request import SamplingParams
from kiln.runtime.step import TOKEN_WAIT


def _engine(args: argparse.Namespace) -> LLMEngine:
    from kiln.config import build_config_from_args
    from kiln.resolve import resolve_engine

    max_seq_len = args.input_len + args.output_len + 16
    build_cfg = build_config_from_args(args, max_batch_size=args.max_batch_size,
                                       max_seq_len=args.max_seq_len or max(max_seq_len, 256),
                                       max_num_tokens=args.max_num_tokens,
                                       tp_size=args.tp_size, pp_size=args.pp_size)
    runtime = RuntimeConfig(  # checked (the device, ...) before a build
        device=args.device, kv_cache_memory_fraction=args.kv_fraction,
        max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens,
        max_seq_len=args.max_seq_len,  # a built engine's limit, as `kiln run` sets it
        custom_all_reduce=getattr(args, "custom_all_reduce", None),
        speculative_config=args.speculative_config,
        attention_sinks=args.attention_sinks, attention_window=args.attention_window,
        scheduler_policy=args.scheduler_policy, pipeline_depth=args.pipeline_depth,
        prefill_graph_tokens=args.prefill_graph_tokens,
        piecewise_graphs=args.piecewise_graphs)
    if args.random_config:
        from kiln.build import build
        from kiln.checkpoint.random import RandomCheckpoint
        from kiln.resolve import cache_dir

        ckpt = RandomCheckpoint(args.random_config)
        engine_dir = cache_dir() / "engines" / random_engine_name(args, build_cfg)
        if not (engine_dir / "engine.json").exists():
            started = time.perf_counter()
            build(ckpt, engine_dir, build_cfg)
            print(f"built {engine_dir} in {time.perf_counter() - started:.1f} s")
    else:
        engine_dir = resolve_engine(args.model, build_cfg)
    started = time.perf_counter()
    engine = LLMEngine(engine_dir, runtime)
    engine.load_seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    return engine


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    low = min(100, vocab // 4)  # clear of the special tokens (a tiny test vocabulary too)
    return [[rng.randrange(low, vocab - low) for _ in range(length)] for _ in range(n)]


def _run_engine(engine: LLMEngine, prompts: list[list[int]], output_len: int,
                progress: bool = True) -> dict[str, Any]:
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(p, params, f"bench-{i}")
    ttft, tpot, steps, shapes, waits = [], [], [], [], []
    engine.stream_outputs = False  # per-request times come from the request stats
    engine.record_launches = True
    with tqdm(total=len(prompts), desc="kiln", unit="req", disable=None if progress else True,
              leave=False) as bar, CompileWatch() as compiles, CollectionWatch() as collected:
        while engine.has_unfinished():
            engine.last_launch = None
            step_start, waited = time.perf_counter(), TOKEN_WAIT[0]
            outputs = engine.step()
            steps.append(time.perf_counter() - step_start)
            waits.append(TOKEN_WAIT[0] - waited)
            shapes.append(engine.last_launch)
            for out in outputs:
                m = out.metrics
                ttft.append(m.first_token_time - m.arrival_time)
                tpot.append((m.finish_time - m.first_token_time) / max(output_len - 1, 1))
                bar.update(1)
    engine.stream_outputs, engine.record_launches = True, False
    elapsed = time.perf_counter() - started
    ttft.sort()
    # Step times as the host sees them (each step waits for the one before on the device):
    # what a decoding request waits between tokens. A step that also takes a prompt chunk
    # (at most max_num_tokens tokens) is the stall the chunk size bounds.
    step_ms = summarize(steps, 1000)
    return {"seconds": elapsed, "ttft_ms": 1000 * ttft[len(ttft) // 2],
            "tpot_ms": 1000 * sorted(tpot)[len(tpot) // 2],
            "output_tok_s": len(prompts) * output_len / elapsed,
            "total_tok_s": len(prompts) * (len(prompts[0]) + output_len) / elapsed,
            "steps": len(steps), "step_ms": {"p50": step_ms["p50"], "p99": step_ms["p99"],
                                             "max": 1000 * max(steps, default=0.0)},
            "step_kinds": step_kinds(steps, shapes, engine.overlap, waits),
            # Triton kernels compiled inside the run (none expected: each stalls its step)
            "compiles": {**compiles.summary(), "events": compiles.events[:20]},
            "garbage_collections": collected.summary()}


def _profiled(engine: LLMEngine, prompts: list[list[int]], output_len: int,
              out_dir: Path) -> dict[str, Any]:
    """_run_engine under torch.profiler with the step phases marked: writes the trace and
    the op table, prints the table (kernels by device time on a GPU, ops by CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    from kiln.runtime import profiling

    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = engine.device.type == "cuda"
    # KILN_PROFILE_CPU=0: device activity only, no per-op host recording, so the idle gaps
    # in the trace are the plain run's (benchmarks/trace_gaps.py), not profiler overhead.
    host = not cuda or os.environ.get("KILN_PROFILE_CPU", "1") != "0"
    activities = ([ProfilerActivity.CPU] if host else []) + \
        ([ProfilerActivity.CUDA] if cuda else [])
    was = profiling.enabled()
    profiling.enable()
    try:
        with profile(activities=activities) as prof:
            result = _run_engine(engine, prompts, output_len)
    finally:
        profiling.enable(was)
    prof.export_chrome_trace(str(out_dir / "trace.json"))
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort, row_limit=30)
    phases = {e.key: e for e in averages if e.key in profiling.PHASES}
    lines = [f"{'phase':18s} {'calls':>7s} {'host ms':>10s} {'us/call':>9s}"]
    for name in profiling.PHASES:
        e = phases.get(name)
        if e is not None:
            lines.append(f"{name:18s} {e.count:7d} {e.cpu_time_total / 1000:10.2f} "
                         f"{e.cpu_time_total / max(e.count, 1):9.1f}")
    text = (f"step phases (host time, inclusive; {out_dir / 'trace.json'} shows them on a "
            "timeline):\n" + "\n".join(lines) + f"\n\nops by {sort}:\n{table}")
    (out_dir / "ops.txt").write_text(text)
    print(text)
    return result


def run(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    check_args(args)
    engine = _engine(args)
    if args.compare_hf and engine.config.build.load_format == "dummy":
        raise KilnError("--compare-hf needs stored weights; this engine was built with "
                        "--load-format dummy")
    vocab = engine.config.model.vocab_size
    prompts = _prompts(args.num_requests, args.input_len, vocab)
    _run_engine(engine, _prompts(min(len(prompts), 4), args.input_len, vocab, seed=1), 4,
                progress=False)  # warm up: kernels compiled, graphs captured
    freeze_startup_heap()  # the loaded engine and what the warm-up made: no full
    # collection in the timed run walks them
    if engine.speculator is not None:
        engine.speculator.reset_stats()
    profile = getattr(args, "profile", None)
    # The profiler's per-op host recording slows kiln (~20% on the CPU), and transformers
    # runs without it: with --compare-hf the numbers (and the ratio) come from a plain
    # timed run, and a second, profiled run only writes the trace.
    kiln = _run_engine(engine, prompts, args.output_len) if args.compare_hf or not profile \
        else None
    counts = _counts(engine)
    if profile:
        # Its own prompts: the timed run's are in the prefix cache now.
        profiled = _profiled(engine, prompts if kiln is None else _prompts(
            len(prompts), args.input_len, vocab, seed=2), args.output_len, Path(profile))
        if kiln is None:
            kiln, counts = profiled, _counts(engine)
    result: dict[str, Any] = {
        "mode": mode, "model": str(engine.engine_dir), "device": _device_name(engine.device),
        "dtype": engine.config.build.dtype, "quantization": engine.config.build.quantization,
        "tp_size": engine.config.build.tp_size, "pp_size": engine.config.build.pp_size,
        "pipeline_depth": engine.pipeline_depth,
        "custom_all_reduce": engine.custom_all_reduce,
        "kv_cache": {"dtype": str(engine.runner.kv_dtype).removeprefix("torch."),
                     "blocks": engine.kv.num_blocks,
                     "tokens": engine.kv.num_blocks * engine.config.build.block_size},
        "input_len": args.input_len,
        "output_len": args.output_len, "num_requests": args.num_requests,
        "engine_load_s": round(engine.load_seconds, 2), "kiln": kiln,  # type: ignore[attr-defined]
        "load_phases": engine.runner.load_phases,  # warm-up, compile threads, graphs (GPU)
        **_graph_routes(engine.runner.graphs),  # graph_routes, graph_replay_ms
        "scheduler_policy": engine.scheduler.policy,
        "max_num_tokens": engine.scheduler.max_num_tokens, **counts,
    }
    if profile:
        result["profile"] = {"dir": profile, "timed_run": "profiled" if kiln is profiled else
                             "plain (the profiled run only wrote the trace)",
                             "output_tok_s": profiled["output_tok_s"]}
    if engine.streaming is not None:
        result["attention_sinks"] = dataclasses.asdict(engine.streaming)
    bandwidth = measured_copy_bandwidth(engine.device)
    if mode == "latency" and bandwidth:
        needed = decode_bytes_per_token(engine, args.input_len + args.output_len // 2)
        result["copy_bandwidth_gb_s"] = bandwidth
        result["decode_bytes_per_token"] = needed
        result["roofline_tpot_ms"] = 1000 * needed / (bandwidth * 1e9)
        result["achieved_bandwidth_gb_s"] = needed / (kiln["tpot_ms"] / 1000) / 1e9
        result["fraction_of_roofline"] = result["roofline_tpot_ms"] / kiln["tpot_ms"]
    if mode == "throughput" and bandwidth:
        rate = measured_gemm_rate(engine.device, engine.runner.dtype,
                                  engine.config.build.quantization == "fp8")
        if rate:
            floor = throughput_floor(engine, args.num_requests, args.input_len,
                                     args.output_len, bandwidth, rate)
            result["floor"] = {**floor, "fraction": floor["seconds"] / kiln["seconds"]}
    if args.compare_hf:
        from kiln.bench import hf_reference

        k = kiln
        print(f"kiln: {k['output_tok_s']:.1f} out tok/s, TTFT {k['ttft_ms']:.1f} ms, TPOT "
              f"{k['tpot_ms']:.2f} ms; now transformers on the same weights", flush=True)
        batch = args.hf_batch or min(len(prompts), 64)
        try:
            result["transformers"] = hf_reference.run_hf(engine, prompts, args.output_len,
                                                          batch)
        except torch.OutOfMemoryError as e:  # transformers' own limit, kiln's result stands
            torch.cuda.empty_cache()
            result["transformers_error"] = f"out of memory at batch {batch}: " \
                f"{str(e).splitlines()[0]}"
        else:
            result["speedup_output_tok_s"] = kiln["output_tok_s"] / \
                result["transformers"]["output_tok_s"]
    _report(result, args.out)
    return result


def _counts(engine: LLMEngine) -> dict[str, Any]:
    """What the engine counted so far of the runs (the JSON's preemptions, speculative)."""
    counts: dict[str, Any] = {"preemptions": engine.scheduler.num_preemptions}
    if engine.speculator is not None:
        counts["speculative"] = {"config": dataclasses.asdict(engine.speculator.config),
                                 **engine.speculator.stats()}
    return counts


def _graph_routes(graphs) -> dict[str, Any]:
    """The decode graphs' routes and replay times (DecodeGraphs.routes_report)."""
    return graphs.routes_report() if graphs is not None else {}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _report(result: dict[str, Any], out: str | None) -> None:
    rows = [("kiln", result["kiln"])]
    if "transformers" in result:
        rows.append(("transformers", result["transformers"]))
    kv = result["kv_cache"]
    print(f"\n{result['mode']} on {result['device']} ({result['dtype']}, quantization "
          f"{result['quantization']}), {result['num_requests']} x {result['input_len']} in / "
          f"{result['output_len']} out; KV cache {kv['dtype']}: {kv['blocks']} blocks = "
          f"{kv['tokens']} tokens; scheduler {result.get('scheduler_policy')}, "
          f"{result.get('preemptions', 0)} preemptions")
    phases = result.get("load_phases") or {}
    if "engine_load_s" in result:
        print(f"engine loaded in {result['engine_load_s']:.1f} s" + "".join(
            f", {label} {phases[key]:.1f} s" for key, label in (
                ("threads_s", "kernels compiled on threads"), ("warm_up_s", "warm-up"),
                ("graphs_s", "CUDA graphs")) if key in phases))
    print(f"{'engine':<14}{'TTFT ms':>10}{'TPOT ms':>10}{'out tok/s':>12}{'total tok/s':>13}")
    for name, r in rows:
        print(f"{name:<14}{r['ttft_ms']:>10.1f}{r['tpot_ms']:>10.2f}{r['output_tok_s']:>12.1f}"
              f"{r['total_tok_s']:>13.1f}")
    if "profile" in result:
        prof = result["profile"]
        print(f"profiled run ({prof['dir']}): {prof['output_tok_s']:.1f} out tok/s under "
              "the profiler" + ("; the table is a plain run's" if prof["timed_run"]
                                != "profiled" else ": the table's (its overhead included)"))
    step = result["kiln"].get("step_ms")
    if step and step["p50"] is not None:
        print(f"steps: {result['kiln']['steps']}, step time p50 {step['p50']:.1f} ms, p99 "
              f"{step['p99']:.1f} ms, max {step['max']:.1f} ms (a step takes at most "
              f"{result.get('max_num_tokens')} prompt tokens beside its decodes: "
              "--max-num-tokens bounds the stall)")
    if result.get("graph_routes"):
        print("decode graphs replayed for faster buckets (KILN_GRAPH_ROUTE=0: off): " +
              describe_routes(result["graph_routes"]))
    compiled = result["kiln"].get("compiles") or {}
    if compiled.get("count"):
        names = ", ".join(f"{k.rsplit('.', 1)[-1]} x{n}" for k, n in compiled["kernels"].items())
        print(f"Triton compiled {compiled['count']} kernel variants inside the timed run "
              f"({compiled['ms']:.0f} ms of stalled steps): {names}")
    collected = result["kiln"].get("garbage_collections") or {}
    if collected.get("full"):
        print(f"Python's garbage collector paused the run {collected['ms']:.0f} ms "
              f"({collected['collections']} collections, {collected['full']} full, the "
              f"longest {collected['full_max_ms']:.0f} ms)")
    for name, k in result["kiln"].get("step_kinds", {}).items():
        waited = k.get("token_wait_seconds", 0.0)
        print(f"{name} steps: {k['steps']} in {k['seconds']:.2f} s, "
              f"{k['decode_rows'] / max(k['steps'], 1):.0f} decode rows a step, "
              f"{k['prompt_tokens']} prompt tokens" + (
                  f"; the host waited for sampled tokens {waited:.2f} s of them "
                  f"({100 * waited / max(k['seconds'], 1e-9):.0f}%; near 0: the device "
                  f"waited on the host), and worked "
                  f"{1000 * (k['seconds'] - waited) / max(k['steps'], 1):.1f} ms a step"
                  if "cpu" not in result["device"] else ""))
    if "floor" in result:
        f = result["floor"]
        print(f"floor {f['output_tok_s']:.0f} out tok/s ({f['seconds']:.1f} s: prefill "
              f"{f['prefill_s']:.1f} s and decode GEMMs {f['decode_gemm_s']:.1f} s at "
              f"{f['gemm_tflops']:.0f} TFLOP/s, KV reads {f['kv_read_s']:.1f} s at "
              f"{f['copy_bandwidth_gb_s']:.0f} GB/s): measured {100 * f['fraction']:.1f}% of it")
    if "fraction_of_roofline" in result:
        print(f"HBM: {result['achieved_bandwidth_gb_s']:.0f} GB/s achieved of "
              f"{result['copy_bandwidth_gb_s']:.0f} GB/s measured copy bandwidth = "
              f"{100 * result['fraction_of_roofline']:.1f}% of roofline")
    if "speculative" in result:
        spec = result["speculative"]
        print(f"speculative ({spec['config']['method']}, k="
              f"{spec['config']['num_speculative_tokens']}): acceptance "
              f"{spec['spec_acceptance_rate']:.2f}, {spec['spec_mean_accepted_length']:.2f} "
              "tokens per verify step")
    if "speedup_output_tok_s" in result:
        print(f"kiln / transformers: {result['speedup_output_tok_s']:.1f}x output tokens/s")
    if "transformers_error" in result:
        print(f"transformers did not finish: {result['transformers_error']} (a smaller "
              "--hf-batch may fit)")
    if out:
        write_json(Path(out), result)
        _plot(rows, result, Path(out).with_suffix(".png"))


def _plot(rows: list[tuple[str, dict]], result: dict[str, Any], path: Path) -> None:
    from kiln.extras import has, missing_extra_message

    if not has("matplotlib"):
        print(f"kiln: no plot: {missing_extra_message('matplotlib')}")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, key, label in zip(axes, ("output_tok_s", "ttft_ms", "tpot_ms"),
                              ("output tokens/s (higher is better)", "TTFT ms", "TPOT ms")):
        ax.bar([n for n, _ in rows], [r[key] for _, r in rows], color=["#c0392b", "#7f8c8d"])
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"kiln bench {result['mode']}: {result['device']}, {result['num_requests']} x "
                 f"{result['input_len']}/{result['output_len']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(modes: argparse._SubParsersAction) -> None:
    for mode, latency, help_text in (
            ("latency", True, "batch-1 TTFT, TPOT, tokens/s and HBM roofline"),
            ("throughput", False, "offline throughput of N fixed-length requests")):
        p = modes.add_parser(mode, help=help_text)
        add_arguments(p, latency)
        p.set_defaults(func=lambda args, mode=mode: run(args, mode))
