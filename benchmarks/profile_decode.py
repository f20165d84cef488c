"""Where a decode step's time goes: step time with graphs/overlap on and off, and the
top GPU kernels of a few decode steps (torch.profiler), at batch 1 or --profile-batch,
then the same grouped (attention, linears, activation, norms, rotary + KV write, LM-head
sampling, copies, other) in ms a step.

    python benchmarks/profile_decode.py ENGINE_DIR [--batch 1] [--context 1000]
    python benchmarks/profile_decode.py ENGINE_DIR --profile-only --profile-batch 296 \
        --context 1500 --kv-fraction 0.6   # a 1000 / 1000 run's mid-decode step
"""

from __future__ import annotations

import argparse
import re
import time

import torch

from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import SamplingParams


def admit(engine: LLMEngine, batch: int, context: int, first: int) -> list[str]:
    """batch requests of context tokens added and stepped until every prompt is in (the
    steps after are decodes only), then a few steps to settle. Their max_tokens is all the
    room left (max_seq_len - context): none finishes in the steps measured after (a prompt
    computed in the first of the admission steps has already decoded one token a step since,
    so a budget of only the measured steps ended requests inside them and the batch shrank:
    the 36th's "296 requests" step timed 13.2 ms where kiln bench's steps of 297 rows took
    17.9). Returns their ids (finish them with release)."""
    room = engine.max_seq_len - context
    params = SamplingParams(max_tokens=room, temperature=0, ignore_eos=True)
    ids = [engine.add_request([first + i] * context, params, f"profile-{first}-{i}")
           for i in range(batch)]
    sched = engine.scheduler
    while sched.waiting or any(r.num_output_tokens == 0 for r in sched.running):
        engine.step()
    for _ in range(4):
        engine.step()
    running = len(sched.running)
    assert running == batch, f"{running} of {batch} requests decoding (KV cache too small?)"
    return ids


def release(engine: LLMEngine, ids: list[str]) -> None:
    for request_id in ids:
        engine.abort(request_id)
    while engine.has_unfinished():
        engine.step()


def decode_ms(engine: LLMEngine, batch: int, context: int, steps: int = 64) -> float:
    ids = admit(engine, batch, context, 100)
    steps = min(steps, engine.max_seq_len - context - 40)  # every request decodes throughout
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    assert len(engine.scheduler.running) == batch, "a request finished inside the timing"
    release(engine, ids)
    return 1000 * elapsed


# kernel name -> part of the step; the first pattern that matches decides
PARTS = [
    ("attention", r"_decode_kernel|_prefill_kernel|attention|flash|_attn"),
    ("linears", r"gemm|gemv|nvjet|xmma|cutlass|_swap|_int_|_fp8_|_mid_|matmul|_mm_|splitK"),
    ("activation (+ quant)", r"silu|act_mul|gelu"),
    ("norms (+ quant)", r"rms_norm|layer_norm|_norm_"),
    ("rotary + KV write", r"rotary|_kv_"),
    ("quantization", r"_quant"),
    ("sampling", r"argmax|sampl|top_k|top_p|softmax"),
    ("copies", r"Memcpy|Memset|copy|elementwise|index|fill|gather|cat"),
]


def on_device(event) -> bool:
    """A kernel or copy itself, not the CPU-side op that launched it (whose "self" device
    time repeats its kernels')."""
    return event.device_type != torch.autograd.DeviceType.CPU


def breakdown(events, steps: int) -> list[tuple[str, float]]:
    """(part, ms a step) of the profiled kernels and copies, by PARTS."""
    totals: dict[str, float] = {}
    for e in events:
        us = e.self_device_time_total
        if not us or not on_device(e):
            continue
        part = next((name for name, pattern in PARTS if re.search(pattern, e.key)), "other")
        totals[part] = totals.get(part, 0.0) + us / 1000 / steps
    order = [name for name, _ in PARTS] + ["other"]
    return [(part, totals[part]) for part in order if part in totals]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--profile-only", action="store_true",
                    help="skip the graphs/overlap on/off table (e.g. for TP engines)")
    ap.add_argument("--profile-batch", type=int, default=1,
                    help="requests decoding in the profiled steps (each --context long)")
    ap.add_argument("--kv-fraction", type=float, default=0.3,
                    help="kv_cache_memory_fraction of the engines")
    args = ap.parse_args()
    engine = None
    if not args.profile_only:
        print(f"{'graphs':>7}{'overlap':>8}{'batch':>6}{'ms/step':>9}")
        for graphs, overlap in ((True, True), (True, False), (False, True), (False, False)):
            del engine
            torch.cuda.empty_cache()
            engine = LLMEngine(args.engine, RuntimeConfig(cuda_graphs=graphs,
                                                          overlap_scheduling=overlap,
                                                          kv_cache_memory_fraction=args.kv_fraction))
            for batch in sorted({1, args.batch}):
                print(f"{graphs!s:>7}{overlap!s:>8}{batch:>6}"
                      f"{decode_ms(engine, batch, args.context):>9.3f}", flush=True)
        del engine
    engine = LLMEngine(args.engine, RuntimeConfig(kv_cache_memory_fraction=args.kv_fraction))
    batch = args.profile_batch
    print(f"batch {batch} decode: {decode_ms(engine, batch, args.context):.3f} ms/step",
          flush=True)
    ids = admit(engine, batch, args.context, 7)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if on_device(e)) / 10
    print(f"GPU kernel time per step (rank 0): {gpu_us / 1000:.3f} ms")
    print(events.table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
    print(f"{'part':24s}{'ms a step':>10s}{'share':>8s}")
    for part, ms in breakdown(events, 10):
        print(f"{part:24s}{ms:10.3f}{100 * ms * 1000 / gpu_us:7.1f}%")
    assert len(engine.scheduler.running) == batch, "a request finished inside the profile"
    release(engine, ids)
    engine.close()


if __name__ == "__main__":
    main()
