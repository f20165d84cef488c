"""Runtime numbers on the CPU: prefix reuse on a shared-system-prompt workload, and
preemptions under a small KV pool (SmolLM2-135M from the default GGUF).

    python benchmarks/runtime_stats.py [--out runtime_stats.json]
"""

from __future__ import annotations

import argparse
import json

from kiln.config import BuildConfig
from kiln.resolve import resolve_engine
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import SamplingParams

SYSTEM = ("You are a careful assistant for a railway company. Answer questions about "
          "timetables, tickets, refunds, luggage, bicycles, pets, accessibility and "
          "delays. Be brief, polite and exact; when unsure, say so and point to the "
          "help desk. ") * 4
QUESTIONS = ["Can I bring my bike?", "When is the last train to Leeds?", "How do refunds work?",
             "Are dogs allowed?", "Is there step-free access at York?", "My train is late.",
             "Can I change my ticket?", "Where is the luggage office?"]


def run(engine: LLMEngine, prompts: list[str], params: SamplingParams,
        sequential: bool) -> dict:
    texts = {}
    batches = [[p] for p in prompts] if sequential else [prompts]
    for batch in batches:
        ids = [engine.add_request(p, params) for p in batch]
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    texts[out.request_id] = out.text
        assert all(i in texts for i in ids)
    return {"texts": [texts[k] for k in sorted(texts, key=int)], **engine.stats()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runtime_stats.json")
    args = ap.parse_args()
    engine_dir = resolve_engine(None, BuildConfig(dtype="float32", max_seq_len=1024))
    prompts = [f"{SYSTEM}\nQuestion: {q}\nAnswer:" for q in QUESTIONS]
    params = SamplingParams(max_tokens=16, temperature=0)
    rows = {}
    for name, prefix in (("without prefix reuse", False), ("with prefix reuse", True)):
        engine = LLMEngine(engine_dir, RuntimeConfig(device="cpu",
                                                     enable_prefix_caching=prefix))
        rows[name] = run(engine, prompts, params, sequential=True)
    # 16 requests of ~300 tokens generating 64 each, in a pool of 64 blocks (1024 tokens).
    long_params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    for name, blocks in (("large KV pool", None), ("small KV pool (64 blocks)", 64)):
        engine = LLMEngine(engine_dir, RuntimeConfig(device="cpu", num_kv_blocks=blocks,
                                                     enable_prefix_caching=False))
        rows[name] = run(engine, prompts * 2, long_params, sequential=False)
    same_prefix = rows["with prefix reuse"]["texts"] == rows["without prefix reuse"]["texts"]
    same_preempt = rows["small KV pool (64 blocks)"]["texts"] == rows["large KV pool"]["texts"]
    print(f"{'run':<28}{'tokens computed':>16}{'hit rate':>10}{'preemptions':>13}")
    for name, r in rows.items():
        print(f"{name:<28}{r['num_computed_tokens']:>16}{r['prefix_cache_hit_rate']:>10.2f}"
              f"{r['num_preemptions']:>13}")
    print(f"identical outputs: prefix reuse {same_prefix}, under preemption {same_preempt}")
    with open(args.out, "w") as f:
        json.dump({k: {x: y for x, y in v.items() if x != "texts"} for k, v in rows.items()}
                  | {"identical_prefix": same_prefix, "identical_preempt": same_preempt},
                  f, indent=2)


if __name__ == "__main__":
    main()
