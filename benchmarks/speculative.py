"""Speculative decoding on one GPU (or the CPU, slowly): what it buys and what it costs.

    python benchmarks/speculative.py ngram [--text botchan.txt] [--out spec-ngram.json]
    python benchmarks/speculative.py overhead [--out spec-overhead.json]

ngram: SmolLM2-135M-Instruct (the default GGUF) copying passages of botchan.txt (given
the passage and the start of its copy) and continuing them (little to copy), greedy,
batch 1 and batch 8: tok/s
without speculation and with n-gram proposals for several k, the acceptance, and whether
the text is identical to plain decoding.

overhead: a Llama-3.1-8B-shape target and a Llama-3.2-1B-shape draft (or --target /
--draft presets), random weights (so acceptance means nothing). Measured: one plain
decode step (a graph replay), one verify step with k = 1..8 drafts (a graph replay) and
one draft decode step, at batch 1; end to end, plain decoding against speculation whose
every draft is rejected (a proposer of random tokens: the cost of the machinery) and
against the 1B draft model. From the step times, the speedup model: with acceptance a
per draft, a verify step emits (1 - a^(k+1)) / (1 - a) tokens on average and costs
T_verify(k) (+ k T_draft for a draft model), against T_plain per token without
speculation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from kiln.bench.report import format_table
from kiln.config import BuildConfig
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def _text(path: str | None) -> tuple[str, str]:
    candidates = [path, os.environ.get("KILN_BOTCHAN"),
                  str(Path.home() / ".cache" / "kiln" / "data" / "botchan.txt"),
                  str(ROOT / "shared" / "botchan.txt"), str(ROOT / "benchmarks" / "botchan.txt")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_text(), Path(candidate).name
    # No botchan.txt here (no network on the GPU box): kiln's own docs are English prose too.
    docs = "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    return docs, "docs/*.md (botchan.txt not found)"


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams,
         batch: int) -> tuple[dict[str, list[int]], float]:
    outputs: dict[str, list[int]] = {}
    engine.stream_outputs = False
    started = time.perf_counter()
    for i in range(0, len(prompts), batch):
        for j, prompt in enumerate(prompts[i:i + batch]):
            engine.add_request(prompt, params, request_id=str(i + j))
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id] = out.token_ids
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return outputs, time.perf_counter() - started


def bench_ngram(args: argparse.Namespace) -> dict[str, Any]:
    from kiln.resolve import resolve_engine

    text, source = _text(args.text)
    engine_dir = resolve_engine(args.model, BuildConfig(max_seq_len=2048, max_batch_size=16))
    plain = LLMEngine(engine_dir, RuntimeConfig(device=args.device, max_batch_size=16))
    tok = plain.tokenizer
    words = text.split()
    rng = random.Random(0)
    starts = sorted(rng.sample(range(len(words) - args.passage_words), args.num_prompts))
    passages = [words[i:i + args.passage_words] for i in starts]
    # A 135M model does not follow "repeat this" instructions, but it does continue a copy
    # that has begun (the copy-heavy case: editing, quoting, code rewrites).
    workloads = {
        "copy": [tok.encode("Original text:\n" + " ".join(p) + "\n\nThe same text, copied "
                            "exactly:\n" + " ".join(p[:10])) for p in passages],
        "continue": [tok.encode(" ".join(p) + "\n\nWhat happened next:") for p in passages],
    }
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    configs: dict[str, dict | None] = {"plain": None}
    for k in args.k:
        configs[f"ngram k={k}"] = {"method": "ngram", "num_speculative_tokens": k,
                                   "prompt_lookup_min": 1, "prompt_lookup_max": 4}
    engines = {name: plain if cfg is None else LLMEngine(engine_dir, RuntimeConfig(
        device=args.device, max_batch_size=16, speculative_config=cfg))
        for name, cfg in configs.items()}
    for engine in engines.values():  # warm up: kernels compiled
        _run(engine, workloads["copy"][:2], SamplingParams(max_tokens=8, temperature=0), 2)
    rows, result = [], {"text": source, "model": str(engine_dir), "runs": []}
    for workload, prompts in workloads.items():
        for batch in args.batch:
            reference = None
            for name, engine in engines.items():
                if engine.speculator is not None:
                    engine.speculator.reset_stats()
                outputs, seconds = _run(engine, prompts, params, batch)
                tokens = sum(len(t) for t in outputs.values())
                if reference is None:
                    reference, plain_tok_s = outputs, tokens / seconds
                stats = engine.stats()
                run = {"workload": workload, "batch": batch, "config": name,
                       "output_tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
                       "speedup": tokens / seconds / plain_tok_s,
                       "acceptance": stats.get("spec_acceptance_rate"),
                       "mean_accepted_length": stats.get("spec_mean_accepted_length"),
                       "identical_to_plain": outputs == reference,
                       "identical_requests": sum(outputs[i] == reference[i] for i in reference),
                       "mean_common_prefix": sum(  # tokens shared before they differ
                           len(os.path.commonprefix([outputs[i], reference[i]]))
                           for i in reference) / len(reference)}
                result["runs"].append(run)
                rows.append([workload, batch, name, f"{run['tok_s']:.1f}",
                             f"{run['speedup']:.2f}x",
                             "-" if run["acceptance"] is None else f"{run['acceptance']:.2f}",
                             "-" if run["mean_accepted_length"] is None
                             else f"{run['mean_accepted_length']:.2f}",
                             "yes" if run["identical_to_plain"] else
                             f"{run['identical_requests']}/{len(reference)} "
                             f"(prefix {run['mean_common_prefix']:.0f})"])
    print(f"SmolLM2 n-gram speculation on {_device(plain)}, {len(passages)} prompts from "
          f"{source}, {args.max_tokens} tokens greedy")
    print(format_table(["workload", "batch", "config", "tok/s", "speedup", "accept",
                        "tokens/step", "same text"], rows))
    return result


def _random_engine(preset: str, max_seq_len: int = 2048) -> Path:
    """Named as `kiln bench --random-config` names it, so either reuses the other's build."""
    from kiln.build import build
    from kiln.checkpoint.random import RandomCheckpoint
    from kiln.resolve import cache_dir

    cfg = BuildConfig(max_seq_len=max_seq_len, max_batch_size=64)
    engine_dir = cache_dir() / "engines" / f"random-{preset}-{cfg.dtype}-{max_seq_len}"
    if not (engine_dir / "engine.json").exists():
        build(RandomCheckpoint(preset), engine_dir, cfg)
    return engine_dir


def _time_replay(graph: torch.cuda.CUDAGraph, repeats: int = 50) -> float:
    """Milliseconds per replay of a captured graph."""
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _set_context(buffers: Any, context: int, block_size: int, width: int = 1) -> None:
    """Point the graph's one sequence at a context of `context` tokens (blocks 0..n-1)."""
    num_blocks = -(-(context + width) // block_size)
    buffers.block_tables[0, :num_blocks] = torch.arange(num_blocks, dtype=torch.int32)
    buffers.seq_lens[0] = context + width
    buffers.positions[:width] = torch.arange(context, context + width)
    buffers.slot_mapping[:width] = torch.arange(context, context + width)
    if hasattr(buffers, "query_start_loc") and width > 1:
        buffers.query_start_loc[:2] = torch.tensor([0, width], dtype=torch.int32)


def bench_overhead(args: argparse.Namespace) -> dict[str, Any]:
    from kiln.runtime.speculative import VerifyGraphs

    if not torch.cuda.is_available():
        raise SystemExit("overhead needs a CUDA GPU (graph replays)")
    target_dir = _random_engine(args.target)
    draft_dir = _random_engine(args.draft)
    common = dict(device="cuda", max_batch_size=8, num_kv_blocks=args.kv_blocks)
    plain = LLMEngine(target_dir, RuntimeConfig(**common))
    block = plain.runner.block_size
    context = args.input_len
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "context": context}
    # Step times at batch 1, as graph replays.
    _set_context(plain.runner.graphs, context, block)
    t_plain = _time_replay(plain.runner.graphs.graphs[1])
    t_verify = {}
    for k in range(1, 9):
        graphs = VerifyGraphs(plain.runner, 1, k)
        graphs.capture()
        _set_context(graphs, context, block, k + 1)
        t_verify[k] = _time_replay(graphs.graphs[1])
        del graphs
        torch.cuda.empty_cache()
    draft = LLMEngine(draft_dir, RuntimeConfig(**common))
    _set_context(draft.runner.graphs, context, block)
    t_draft = _time_replay(draft.runner.graphs.graphs[1])
    del draft
    torch.cuda.empty_cache()
    result["step_ms"] = {"plain": t_plain, "draft_1b": t_draft,
                         "verify": {str(k): v for k, v in t_verify.items()}}
    rows = [[k, f"{t_verify[k]:.3f}", f"{t_verify[k] / t_plain:.2f}"] for k in t_verify]
    print(f"{args.target} shape (random, bf16) on {result['device']}, batch 1, context "
          f"{context}: plain step {t_plain:.3f} ms, {args.draft} draft step {t_draft:.3f} ms")
    print(format_table(["k", "verify ms", "x plain"], rows))
    # The speedup model.
    model_rows, result["speedup_model"] = [], []
    for a in (0.6, 0.8):
        for k in range(1, 9):
            emitted = (1 - a ** (k + 1)) / (1 - a)
            free = emitted * t_plain / t_verify[k]
            with_draft = emitted * t_plain / (t_verify[k] + k * t_draft)
            result["speedup_model"].append({"acceptance": a, "k": k, "tokens_per_step": emitted,
                                            "speedup_free_proposer": free,
                                            "speedup_1b_draft": with_draft})
            model_rows.append([a, k, f"{emitted:.2f}", f"{free:.2f}x", f"{with_draft:.2f}x"])
    print(format_table(["acceptance", "k", "tokens/step", "speedup (n-gram)",
                        "speedup (draft)"], model_rows))
    if args.steps_only:
        return result
    # End to end at zero acceptance.
    vocab = plain.config.model.vocab_size
    prompts = [[random.Random(i).randrange(vocab // 50, vocab) for _ in range(args.input_len)]
               for i in range(args.num_prompts)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    _run(plain, prompts[:1], SamplingParams(max_tokens=8, temperature=0), 1)
    _, seconds = _run(plain, prompts, params, 1)
    tokens = args.num_prompts * args.output_len
    e2e = {"plain": tokens / seconds}
    del plain
    torch.cuda.empty_cache()
    k = args.e2e_k
    for adaptive in (True, False):
        rejected = LLMEngine(target_dir, RuntimeConfig(**common, speculative_config={
            "method": "ngram", "num_speculative_tokens": k, "adaptive": adaptive}))
        vocab = rejected.config.model.vocab_size

        # Random drafts: never what a random model picks.
        def random_drafts(requests: list, vocab: int = vocab) -> None:
            for r in requests:
                room = min(k, r.max_tokens - r.num_output_tokens - 1)
                r.spec_token_ids = [random.randrange(vocab) for _ in range(max(room, 0))]
        rejected.speculator._propose = random_drafts  # type: ignore[method-assign]
        _run(rejected, prompts[:1], SamplingParams(max_tokens=8, temperature=0), 1)
        rejected.speculator.reset_stats()
        _, seconds = _run(rejected, prompts, params, 1)
        name = "adaptive (pauses)" if adaptive else "adaptive off: every step verifies"
        e2e[f"all drafts rejected k={k}, {name}"] = tokens / seconds
        result[f"verify_steps_rejected_adaptive_{adaptive}"] = \
            rejected.speculator.num_verify_steps
        acceptance_rejected = rejected.stats()["spec_acceptance_rate"]
        del rejected
        torch.cuda.empty_cache()
    with_draft = LLMEngine(target_dir, RuntimeConfig(**common, speculative_config={
        "method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": k}))
    _run(with_draft, prompts, params, 1)  # warm up: every catch-up length compiled
    with_draft.speculator.reset_stats()  # the draft's cost counters too
    draft = with_draft.speculator.draft
    _, seconds = _run(with_draft, prompts, params, 1)
    e2e[f"{args.draft} draft model k={k} (random: ~0 acceptance)"] = tokens / seconds
    result["draft_model_run"] = {
        "seconds": seconds, "verify_steps": with_draft.speculator.num_verify_steps,
        "acceptance": with_draft.stats()["spec_acceptance_rate"],
        "graph_forwards": draft.num_graph_forwards, "eager_forwards": draft.num_eager_forwards,
        "propose_seconds": draft.propose_seconds}
    print("draft model run:", ", ".join(f"{key} {value:.4g}" if isinstance(value, float)
                                        else f"{key} {value}"
                                        for key, value in result["draft_model_run"].items()))
    result["e2e_tok_s"] = e2e
    result["acceptance_random_drafts"] = acceptance_rejected
    print(format_table(["end to end, batch 1", "tok/s", "x plain"],
                       [[name, f"{v:.1f}", f"{v / e2e['plain']:.3f}"] for name, v in e2e.items()]))
    return result


def _device(engine: LLMEngine) -> str:
    return torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("ngram")
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--text", default=None, help="botchan.txt (default: ~/.cache/kiln/data)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--passage-words", type=int, default=200)
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--device", default="auto")
    p = sub.add_parser("overhead")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument("--e2e-k", type=int, default=4)
    p.add_argument("--kv-blocks", type=int, default=2048)
    p.add_argument("--target", default="llama-3.1-8b", help="random-weight preset")
    p.add_argument("--draft", default="llama-3.2-1b", help="random-weight preset")
    p.add_argument("--steps-only", action="store_true",
                   help="graph-replay step times and the speedup model, no end-to-end runs")
    for p in sub.choices.values():
        p.add_argument("--out", default=None, help="JSON result path")
    args = ap.parse_args()
    result = bench_ngram(args) if args.mode == "ngram" else bench_overhead(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
