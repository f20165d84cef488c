"""kiln vs transformers `generate` on the default model, side by side in one process.

    python benchmarks/compare_hf_cpu.py [--prompts 8] [--new-tokens 64] [--out result.json]

Both run greedy in float32 on the same weights (the SmolLM2 GGUF); transformers gets the
prompts as one left-padded batch, kiln as concurrent requests.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a village,",
           "1, 2, 3, 4,", "Why is the sky blue?", "Water boils at", "My favourite food is",
           "The quick brown fox"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default="compare_hf_cpu.json")
    args = ap.parse_args()
    prompts = (PROMPTS * 8)[: args.prompts]

    import transformers

    from kiln import LLM, SamplingParams
    from kiln.config import BuildConfig
    from kiln.resolve import default_model

    gguf = default_model()
    llm = LLM(None, BuildConfig(dtype="float32"), device="cpu")
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    kiln_s = time.perf_counter() - start

    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.padding_side = "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, do_sample=False)  # warm up
        start = time.perf_counter()
        hf_out = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=tok.eos_token_id)
        hf_s = time.perf_counter() - start
    hf_new = hf_out[:, batch.input_ids.shape[1]:]
    same = sum(o.token_ids == h.tolist() for o, h in zip(outs, hf_new))
    total = args.prompts * args.new_tokens
    result = {
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads",
        "model": gguf.name, "prompts": args.prompts, "new_tokens": args.new_tokens,
        "kiln_seconds": round(kiln_s, 3), "kiln_tok_per_s": round(total / kiln_s, 1),
        "hf_seconds": round(hf_s, 3), "hf_tok_per_s": round(total / hf_s, 1),
        "speedup": round(hf_s / kiln_s, 2), "identical_greedy_outputs": f"{same}/{len(outs)}",
    }
    print(f"{'engine':<14}{'seconds':>10}{'tok/s':>10}")
    print(f"{'kiln':<14}{kiln_s:>10.2f}{total / kiln_s:>10.1f}")
    print(f"{'transformers':<14}{hf_s:>10.2f}{total / hf_s:>10.1f}")
    print(f"speedup {result['speedup']}x, identical greedy outputs "
          f"{result['identical_greedy_outputs']} (left padding can change transformers' numerics)")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
