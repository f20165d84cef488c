"""Where a decode step's time goes: step time with graphs/overlap on and off, and the
top GPU kernels of a few batch-1 decode steps (torch.profiler).

    python benchmarks/profile_decode.py ENGINE_DIR [--batch 1] [--context 1000]
"""

from __future__ import annotations

import argparse
import time

import torch

from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import SamplingParams


def decode_ms(engine: LLMEngine, batch: int, context: int, steps: int = 64) -> float:
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request([100 + i] * context, params)
    for _ in range(6):  # prefill and settle
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    while engine.has_unfinished():
        engine.step()
    return 1000 * elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--profile-only", action="store_true",
                    help="skip the graphs/overlap on/off table (e.g. for TP engines)")
    args = ap.parse_args()
    engine = None
    if not args.profile_only:
        print(f"{'graphs':>7}{'overlap':>8}{'batch':>6}{'ms/step':>9}")
        for graphs, overlap in ((True, True), (True, False), (False, True), (False, False)):
            del engine
            torch.cuda.empty_cache()
            engine = LLMEngine(args.engine, RuntimeConfig(cuda_graphs=graphs,
                                                          overlap_scheduling=overlap,
                                                          kv_cache_memory_fraction=0.3))
            for batch in sorted({1, args.batch}):
                print(f"{graphs!s:>7}{overlap!s:>8}{batch:>6}"
                      f"{decode_ms(engine, batch, args.context):>9.3f}", flush=True)
        del engine
    engine = LLMEngine(args.engine, RuntimeConfig(kv_cache_memory_fraction=0.3))
    print(f"batch 1 decode: {decode_ms(engine, 1, args.context):.3f} ms/step", flush=True)
    decode_ms(engine, 1, args.context, steps=8)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    engine.add_request([7] * args.context, params)
    for _ in range(8):
        engine.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) / 10
    print(f"GPU kernel time per step (rank 0): {gpu_us / 1000:.3f} ms")
    print(events.table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
    engine.close()


if __name__ == "__main__":
    main()
