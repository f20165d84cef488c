"""25th session, call 6: cold loads (Triton's cache empty) of a Llama-3.2-1B-shape engine
(dummy weights, seeded), the warm-up's compiles one by one (KILN_COMPILE_THREADS=0) vs on
12 threads: load seconds, kernels compiled on threads, compiles after load, and the greedy
tokens of 4 prompts (must match)."""
import json
import os
import shutil
import subprocess
import sys

OUT = os.environ.get("OUT", "/tmp")
ENGINE = "/tmp/e1b"
subprocess.run([sys.executable, "-m", "kiln.cli", "build", "--random-weights", "--config",
                "llama-3.2-1b", "--load-format", "dummy", "--max-seq-len", "2048", "-o",
                ENGINE], check=True, timeout=60, capture_output=True)
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import SamplingParams
e = LLMEngine(sys.argv[1], RuntimeConfig(device="cuda"))
load = time.perf_counter() - t0
for i, k in enumerate((1, 3, 7, 20)):
    e.add_request([1, 2, 3, 4, 5] * k, SamplingParams(max_tokens=16, temperature=0,
                  ignore_eos=True), request_id=str(i))
res = {}
while e.has_unfinished():
    for o in e.step():
        if o.finished:
            res[o.request_id] = o.token_ids
stats = {k: v for k, v in e.stats().items() if "compile" in k}
print(json.dumps(dict(load_s=round(load, 2), precompiled=e.runner.load_phases.get("kernels_on_threads", 0), stats=stats,
                      tokens=res)))
"""
results = {}
for threads in [int(t) for t in os.environ.get('THREADS', '0,12').split(',')]:
    cache = f"/tmp/tc{threads}"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, TRITON_CACHE_DIR=cache, KILN_COMPILE_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", CHILD, ENGINE], capture_output=True,
                          text=True, timeout=100, env=env)
    if done.returncode:
        print(threads, "failed:", done.stderr[-1500:], flush=True)
        continue
    results[threads] = r = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"threads {threads}: load {r['load_s']} s, {r['precompiled']} kernels on threads, "
          f"{r['stats']}", flush=True)
    with open(os.path.join(OUT, "cold_load.json"), "w") as f:
        json.dump(results, f, indent=1)
if len(results) > 1:
    print("same tokens:", len({json.dumps(r["tokens"]) for r in results.values()}) == 1)
