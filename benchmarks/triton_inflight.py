"""In-flight batching inside Triton: N concurrent generate requests through a real
tritonserver (kiln's Python-backend model, one instance, one engine) against the same N
prompts in one `LLM.generate` call, and against N requests sent one after another.

    python benchmarks/triton_inflight.py --triton-env .venv-triton [--engine DIR]
        [--requests 16] [--max-tokens 32] [--device cpu] [--out triton_inflight.json]

Without --engine it builds the default model (SmolLM2-135M) in float32. Prints a table
and writes JSON; the ratio `triton_concurrent / llm_generate` is the number to watch
(1.0 = batching inside Triton as good as kiln's own).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from kiln import LLM, SamplingParams
from kiln.distributed.launch import free_port
from kiln.serve.triton_repo import write_triton_repo
from kiln.serve.triton_server import prepare_triton_env, tritonserver_command


def _prompts(n: int) -> list[str]:
    return [f"Question {i}: name a city in country number {i} and describe it." for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--triton-env", required=True)
    ap.add_argument("--engine", default=None)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch, here and in the server (a busy CPU: 1)")
    ap.add_argument("--out", default="triton_inflight.json")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="kiln-triton-bench-"))
    engine = args.engine
    if engine is None:
        from kiln.config import BuildConfig
        from kiln.resolve import resolve_engine

        engine = str(resolve_engine(None, BuildConfig(dtype="float32", max_batch_size=64)))
    write_triton_repo(engine, work / "repo", device=args.device)
    env = prepare_triton_env(args.triton_env)
    port = free_port()
    argv, environ = tritonserver_command(env, work / "repo", port, free_port(), free_port())
    if args.threads:
        environ["OMP_NUM_THREADS"] = str(args.threads)
    log = open(work / "tritonserver.log", "w")
    server = subprocess.Popen(argv, env=environ, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v2/models/kiln/generate"
    prompts = _prompts(args.requests)
    body = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
            "exclude_input_in_output": True}

    # One client for all requests: httpx.post makes a client per call, and each one's TLS
    # setup (~20 ms of CPU, under the GIL) staggered the 16 "concurrent" requests by
    # hundreds of ms before they left this process.
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=args.requests))

    def one(prompt: str) -> str:
        r = client.post(url, json={"text_input": prompt, **body})
        r.raise_for_status()
        return r.json()["text_output"]

    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"tritonserver exited; see {work / 'tritonserver.log'}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        one(prompts[0])  # warm up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            concurrent = list(pool.map(one, prompts))
        t_concurrent = time.perf_counter() - t0
        t0 = time.perf_counter()
        sequential = [one(p) for p in prompts]
        t_sequential = time.perf_counter() - t0
    finally:
        client.close()
        server.terminate()
        server.wait(60)

    llm = LLM(engine, device=args.device)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], params)  # warm up
    t0 = time.perf_counter()
    reference = [o.text for o in llm.generate(prompts, params)]
    t_llm = time.perf_counter() - t0

    result = {"requests": len(prompts), "max_tokens": args.max_tokens, "device": args.device,
              "threads": args.threads,
              "llm_generate_s": t_llm, "triton_concurrent_s": t_concurrent,
              "triton_sequential_s": t_sequential,
              "concurrent_over_llm": t_concurrent / t_llm,
              "sequential_over_concurrent": t_sequential / t_concurrent,
              "same_text_concurrent": concurrent == reference,
              "same_text_sequential": sequential == reference}
    print(f"{'path':<32}{'seconds':>10}")
    for name, key in [("LLM.generate (one call)", "llm_generate_s"),
                      (f"Triton, {len(prompts)} concurrent", "triton_concurrent_s"),
                      (f"Triton, {len(prompts)} one by one", "triton_sequential_s")]:
        print(f"{name:<32}{result[key]:>10.2f}")
    print(f"concurrent / LLM.generate = {result['concurrent_over_llm']:.2f}; "
          f"sequential / concurrent = {result['sequential_over_concurrent']:.1f}; "
          f"same greedy text: {result['same_text_concurrent']}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
