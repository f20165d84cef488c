"""Time to first token of lone prompts (one request at a time on an idle engine), with the
prefill replayed from CUDA graphs and eagerly, in one process on one card.

    python benchmarks/ttft.py --random-config llama-3.1-8b --load-format dummy \
        --quantization fp8 --kv-cache-dtype fp8 --max-seq-len 2048 \
        --lengths 128,1000,2000 --repeats 5 --out ttft.json

Each prompt is new (no prefix-cache hit) and asks for one token; the time is from
add_request to the finished output on the host, as a client sees it. The first prompt of
each length is a warm-up and not counted. Variants (--variants, prefill graph token
limits; 0: eager) run one after another, the engine of one freed before the next loads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kiln.bench import offline
from kiln.bench.hf_reference import release_device_memory
from kiln.runtime.request import SamplingParams


def lone_ttft_ms(engine, length: int, repeats: int, background: int = 0) -> list[float]:
    """TTFT of `repeats` new prompts (after one warm-up), each added alone, or while
    `background` other requests are decoding (kept running: a mixed step then holds the
    new prompt and their decode rows)."""
    vocab = engine.config.model.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    busy = SamplingParams(max_tokens=engine.max_seq_len - 160, temperature=0,
                          ignore_eos=True)
    running: set[str] = set()
    times = []
    for r in range(repeats + 1):
        for i in range(background - len(running)):  # top the decoding requests up
            rid = f"bg-{r}-{i}"
            engine.add_request(offline._prompts(1, 128, vocab, seed=31 * r + i)[0], busy,
                               request_id=rid)
            running.add(rid)
        while background and engine.scheduler.waiting:  # all decoding first
            running -= {o.request_id for o in engine.step() if o.finished}
        prompt = offline._prompts(1, length, vocab, seed=7919 * length + r)[0]
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        started = time.perf_counter()
        rid = engine.add_request(prompt, params, request_id=f"ttft-{r}")
        done = False
        while not done:
            for out in engine.step():
                if out.request_id == rid and out.finished:
                    done = True
                elif out.finished:
                    running.discard(out.request_id)
        times.append(1000 * (time.perf_counter() - started))
    for rid in running:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    return times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    offline.add_arguments(p, latency=True)
    p.add_argument("--lengths", default="128,1000,2000")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default="2048,0",
                   help="prefill graph token limits to compare (0: eager prefill; a pw "
                   "prefix also turns on the piecewise graphs of mixed steps, e.g. pw2048)")
    p.add_argument("--background", type=int, default=0, metavar="N",
                   help="N other requests decoding while each prompt arrives (mixed steps)")
    args = p.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    result: dict = {"lengths": lengths, "repeats": args.repeats, "variants": {}}
    result["background"] = args.background
    for name in args.variants.split(","):
        args.piecewise_graphs = name.startswith("pw")
        variant = args.prefill_graph_tokens = int(name.removeprefix("pw"))
        engine = offline._engine(args)
        result["device"] = offline._device_name(engine.device)
        result["quantization"] = engine.config.build.quantization
        rows = result["variants"][name] = {}
        for n in lengths:
            ms = lone_ttft_ms(engine, n, args.repeats, args.background)
            rows[str(n)] = {"median_ms": statistics.median(ms), "min_ms": min(ms),
                            "max_ms": max(ms), "runs_ms": ms}
            print(f"{name:>6} (graphs up to {variant} tokens), prompt {n:>5}: TTFT median "
                  f"{statistics.median(ms):7.2f} ms (min {min(ms):.2f}, max {max(ms):.2f})",
                  flush=True)
        if engine.device.type == "cuda":
            release_device_memory(engine)
        del engine
    print(f"{result.get('device')}, quantization {result.get('quantization')}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
