"""Long prompts on the CPU: kiln's prefill (time to the first token) against a
transformers forward over the same prompt, side by side in one process, alternating.

    python benchmarks/prefill_cpu.py [--lengths 512,2048,4000] [--repeats 3] [--out f.json]

Both in float32 on the default model's weights (the SmolLM2 GGUF), one prompt at a time,
cut from kiln's shipped calibration text (another cut each repeat, so kiln's prefix cache
never hits); prints the median and spread of each.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="512,2048,4000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="prefill_cpu.json")
    args = ap.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]

    import transformers

    import kiln
    from kiln import LLM, SamplingParams
    from kiln.config import BuildConfig
    from kiln.resolve import default_model

    gguf = default_model()
    llm = LLM(None, BuildConfig(dtype="float32", max_seq_len=max(4096, max(lengths) + 1)),
              device="cpu")
    text = (Path(kiln.__file__).parent / "data" / "calibration.txt").read_text()
    ids = llm.tokenizer.encode(text)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    one = SamplingParams(max_tokens=1, temperature=0)
    llm.generate([ids[:64]], one)  # warm up both
    with torch.no_grad():
        model(torch.tensor([ids[:64]]))
    rows = []
    for n in lengths:
        times = {"kiln": [], "transformers": []}
        for r in range(args.repeats):  # another prompt each time: no prefix-cache hits
            prompt = ids[97 * r:97 * r + n]
            start = time.perf_counter()
            llm.generate([prompt], one)
            times["kiln"].append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad():
                model(torch.tensor([prompt]))
            times["transformers"].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"tokens": n, **{f"{k}_s": v for k, v in times.items()},
                     "ratio": med["transformers"] / med["kiln"]})
        print(f"{n:6d} tokens  kiln {med['kiln']:7.2f} s ({min(times['kiln']):.2f}-"
              f"{max(times['kiln']):.2f})  transformers {med['transformers']:7.2f} s "
              f"({min(times['transformers']):.2f}-{max(times['transformers']):.2f})  "
              f"kiln {rows[-1]['ratio']:.2f}x", flush=True)
    Path(args.out).write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
