"""The scheduler alone on an offline throughput workload: steps, preemptions, prompt tokens
recomputed after preemption, the mean decode batch, and a rough device-time model, per
scheduling policy. No model runs, so it takes seconds on any machine.

    python benchmarks/scheduler_sim.py [--blocks 50340] [--requests 1000] [--input-len 1000]
        [--output-len 1000] [--max-batch-size 512] [--max-num-tokens 16384]

Defaults: the bf16 Llama-3.1-8B engine of BENCHMARKS.md on one H200 (50,340 KV blocks of
16 tokens). The time model charges each step max(bytes / bandwidth, FLOPs / rate): weights
plus the KV it reads against `--bandwidth`, 2 x params FLOPs a token against `--flops`;
measured runs are slower (kernel efficiencies), so compare policies, not absolute values.
"""

from __future__ import annotations

import argparse

from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.request import Request, RequestStatus, SamplingParams
from kiln.runtime.scheduler import POLICIES, Scheduler


def simulate(policy: str, args: argparse.Namespace) -> dict[str, float]:
    kv = KVCacheManager(args.blocks, 16, enable_prefix_caching=False)
    scheduler = Scheduler(kv, args.max_batch_size, args.max_num_tokens, policy)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    for i in range(args.requests):
        prompt = [5 + (i * 7 + j) % 1000 for j in range(args.input_len)]
        scheduler.add(Request(str(i), prompt, params, args.output_len))
    steps = prefill = decode_rows = 0
    seconds = 0.0
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        if not out:
            raise SystemExit("the KV cache cannot hold one request")
        steps += 1
        # decode rows: one new token of a request whose prompt is computed; the rest is
        # prefill (first time, or recomputed after a preemption)
        decoding = [e.num_new_tokens == 1 and e.request.num_computed_tokens >=
                    e.request.num_prompt_tokens for e in out.scheduled]
        rows = sum(decoding)
        new = sum(e.num_new_tokens for e, d in zip(out.scheduled, decoding) if not d)
        kv_tokens = sum(e.request.num_computed_tokens + e.num_new_tokens for e in out.scheduled)
        memory = (args.weight_bytes + kv_tokens * args.kv_bytes_per_token) / args.bandwidth
        seconds += max(memory, (new + rows) * 2 * args.params / args.flops)
        prefill, decode_rows = prefill + new, decode_rows + rows
        scheduler.update(out)
        for entry in out.scheduled:
            request = entry.request
            if entry.sample:
                request.token_ids.append(7)
                if request.num_output_tokens >= request.max_tokens:
                    scheduler.finish(request, RequestStatus.FINISHED_LENGTH)
    return {"steps": steps, "preemptions": scheduler.num_preemptions,
            "recomputed_tokens": prefill - args.requests * args.input_len,
            "mean_decode_batch": decode_rows / steps, "model_seconds": seconds,
            "model_out_tok_s": args.requests * args.output_len / seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=50340)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=1000)
    ap.add_argument("--max-batch-size", type=int, default=512)
    ap.add_argument("--max-num-tokens", type=int, default=16384)
    ap.add_argument("--params", type=float, default=8.0e9)
    ap.add_argument("--weight-bytes", type=float, default=16.1e9)
    ap.add_argument("--kv-bytes-per-token", type=float, default=131072)  # bf16, 32 x 8 x 128
    ap.add_argument("--bandwidth", type=float, default=4.2e12)
    ap.add_argument("--flops", type=float, default=7.0e14)
    args = ap.parse_args()
    print(f"{'policy':22}{'steps':>7}{'preempt':>9}{'recomputed':>12}{'batch':>8}"
          f"{'model s':>9}{'out tok/s':>11}")
    for policy in POLICIES:
        r = simulate(policy, args)
        print(f"{policy:22}{r['steps']:>7}{r['preemptions']:>9}{r['recomputed_tokens']:>12}"
              f"{r['mean_decode_batch']:>8.1f}{r['model_seconds']:>9.1f}"
              f"{r['model_out_tok_s']:>11.0f}")


if __name__ == "__main__":
    main()
