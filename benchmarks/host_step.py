"""The engine's host work per decode step at large batches, on any machine.

    python benchmarks/host_step.py [--batch 256,512] [--steps 40] [--repeats 3] [--stream]
        [--out host_step.json]

With overlap scheduling the device computes step N while the host schedules step N + 1,
prepares its inputs and applies step N - 1's tokens; when that host work takes longer
than a decode graph's replay (~10 ms at 512 rows of an FP8 8B model on an H200) the
device waits. This runs a random-weight engine whose forward costs almost nothing (the
Llama layout at hidden 64, one layer, a 4,096-token vocabulary, float32 on the CPU) at
`--batch` running requests (128-token prompts, greedy, ignore_eos) and times `--steps`
decode steps: the wall time per step less the model's forward and sampling (on a GPU those
are a graph replay the host only launches), and that host time by phase (schedule,
prepare, sampling parameters, apply: tokens, text, stop checks and outputs; update: the
scheduler's computed counts and prefix-cache commits). `--stream` builds every request's
output each step, as `kiln serve` does (offline runs build finished requests' only).
Median and range over `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

ENGINE = Path("/tmp/kiln-host-step-engine")


def engine_dir(vocab: int) -> Path:
    from kiln.build import build
    from kiln.checkpoint.random import RandomCheckpoint
    from kiln.config import BuildConfig, ModelConfig

    out = ENGINE.with_name(f"{ENGINE.name}-{vocab}")
    if not (out / "engine.json").exists():
        cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=64,
                          intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2,
                          head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                          max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,))
        build(RandomCheckpoint(cfg, dtype=torch.float32), out,
              BuildConfig(dtype="float32", max_batch_size=512, max_seq_len=1024,
                          max_num_tokens=16384), progress=False)
    return out


def timed(obj, name: str, acc: dict, key: str):
    """Wrap obj.name (a method, a module's function, a classmethod) so that its time adds
    to acc[key]; returns what puts the original back."""
    original = vars(obj).get(name) if isinstance(obj, type) else getattr(obj, name)
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[key] += time.perf_counter() - t
    setattr(obj, name, wrapper)
    return lambda: setattr(obj, name, original)


def run(batch: int, steps: int, stream: bool, vocab: int) -> dict:
    from kiln.runtime import model_runner, sampler
    from kiln.runtime.engine import LLMEngine, RuntimeConfig
    from kiln.runtime.request import SamplingParams

    engine = LLMEngine(engine_dir(vocab), RuntimeConfig(device="cpu", max_batch_size=batch))
    engine.stream_outputs = stream
    acc: dict[str, float] = defaultdict(float)
    timed(engine.runner, "_forward", acc, "forward")
    timed(engine.scheduler, "schedule", acc, "schedule")
    timed(engine.scheduler, "update", acc, "update")
    timed(engine.runner, "prepare", acc, "prepare")
    timed(engine, "_process", acc, "apply")
    # module-level ones: put back after the run
    restore = [timed(sampler.SamplingBatch, "from_requests", acc, "sampling params"),
               timed(model_runner, "sample", acc, "forward")]
    try:
        rng = random.Random(batch)
        params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
        for i in range(batch):
            engine.add_request([rng.randrange(3, vocab - 1) for _ in range(128)], params,
                               request_id=str(i))
        while engine.scheduler.waiting or any(
                r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
            engine.step()
        for _ in range(2):
            engine.step()
        acc.clear()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - start) / steps * 1e3
        phases = {k: v / steps * 1e3 for k, v in acc.items()}  # before the drain below
        while engine.has_unfinished():
            engine.step()
    finally:
        for undo in restore:
            undo()
    host = wall - phases.pop("forward", 0.0)
    return dict(batch=batch, stream=stream, wall_ms=wall, host_ms=host,
                phases_ms={k: v for k, v in phases.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="256,512")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        runs = [run(batch, args.steps, args.stream, args.vocab) for _ in range(args.repeats)]
        host = [r["host_ms"] for r in runs]
        phases = {k: statistics.median(r["phases_ms"].get(k, 0.0) for r in runs)
                  for k in runs[0]["phases_ms"]}
        row = dict(batch=batch, stream=args.stream, host_ms=statistics.median(host),
                   host_ms_range=[min(host), max(host)],
                   wall_ms=statistics.median(r["wall_ms"] for r in runs), phases_ms=phases)
        rows.append(row)
        detail = ", ".join(f"{k} {v:.2f}" for k, v in sorted(phases.items(),
                                                            key=lambda kv: -kv[1]))
        print(f"batch {batch:4d}{' stream' if args.stream else ''}: host {row['host_ms']:.2f} "
              f"ms a step ({min(host):.2f}-{max(host):.2f}), wall {row['wall_ms']:.2f}; "
              f"{detail}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
