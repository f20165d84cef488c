"""The warm-up's Triton kernels compiled on several threads: on by default on one GPU,
min(12, the CPUs this process may use) threads; KILN_COMPILE_THREADS=N sets the count, 0 or
1 turns it off (the kernels then compile one by one as the warm-up reaches them).

On a machine whose Triton cache is empty (a fresh container), loading an engine spends
most of its time compiling: an 8B engine loads in 17.5 s (bf16) / 24.5 s (FP8) on an H200
against 7.3 s with the cache warm, one kernel after another as the warm-up's steps reach
them. A compile is mostly MLIR passes and ptxas, which run without Python's lock: six
decode-kernel compiles for sm_90 take 2.28 s one after another, 1.36 s on two threads of
a 2-core machine; a Llama-3.2-1B-shape engine loads cold in 17-19 s on 12 threads instead
of 25-29 s, the same tokens (BENCHMARKS.md, twenty-fifth session); Llama-3.1-8B bf16 in
14.0 s instead of 17.9 (twenty-sixth; its GPU test over llama, mixtral, gemma2, FP8 + FP8
KV and int4 passed there).

So the warm-up runs twice. First with Triton's cache hook answering "handled" for every
kernel that would compile: the launch is skipped and the kernel's specialization recorded.
Its outputs stay unwritten, which is safe because the warm-up's inputs are made on the
host and nothing reads a kernel's output as an index (its sampling draws by an
exponential race, and this pass gathers no logprobs at the sampled ids); a pass that
fails anyway is logged and the load goes on. Then the recorded kernels compile on N
threads (JITFunction.preload, the specialization Triton serialized), and the real warm-up
finds them compiled. One process of one GPU only (ranks would skip collectives' kernels
in step, but a rank's custom all-reduce waits on its peers' launches).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

log = logging.getLogger(__name__)


def _threads() -> int:
    value = os.environ.get("KILN_COMPILE_THREADS", "").strip()
    if value:
        try:
            return int(value)
        except ValueError:
            log.warning("KILN_COMPILE_THREADS=%r is not a number of threads; using the "
                        "default", value)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(12, cpus)


THREADS = _threads()


def graph_steps(max_batch_size: int, prefill_tokens: int, max_seq_len: int
                ) -> list[list[tuple[int, int]]]:
    """Eager steps shaped as the CUDA graphs captured after the warm-up (decode rows at
    each batch bucket, a lone prompt at each token bucket: their GEMM launches differ by
    row count), as (new tokens, context) a sequence, for the skipped pass only: its
    kernels then compile on the threads too, not one by one inside the capture."""
    from kiln.runtime.cuda_graphs import batch_buckets, prefill_buckets, prefill_graph_tokens

    steps = [[(1, min(64, max_seq_len))] * b for b in batch_buckets(max_batch_size)] \
        if max_batch_size > 0 else []
    prefill_tokens = prefill_graph_tokens(prefill_tokens)
    if prefill_tokens:
        steps += [[(t, t)] for t in prefill_buckets(prefill_tokens) if t <= max_seq_len]
    return steps


def compile_in_parallel(run: Callable[[], object], device: torch.device, threads: int
                        ) -> tuple[int, float]:
    """Run `run` with every kernel launch that would compile skipped and recorded, then
    compile those on `threads` threads; (kernels compiled, seconds)."""
    from triton import knobs

    started = time.perf_counter()
    found: dict[tuple[int, str], tuple[object, str]] = {}

    def defer(**kw: object) -> bool:
        fn = kw["fn"].jit_function  # type: ignore[attr-defined]
        found.setdefault((id(fn), str(kw["key"])),
                         (fn, kw["compile"]["specialization_data"]))  # type: ignore[index]
        return True  # handled: no compile, no launch

    chained = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = defer
    try:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # on unwritten outputs: the real warm-up compiles the rest
        log.warning("the skipped warm-up pass stopped (%s: %s); compiling what it found",
                    type(e).__name__, e)
    finally:
        knobs.runtime.jit_cache_hook = chained

    index = (device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else None

    def compile_one(item: tuple[object, str]) -> None:
        fn, data = item
        if index is not None:
            torch.cuda.set_device(index)  # Triton compiles for the thread's current device
        try:
            fn.preload(data)  # type: ignore[attr-defined]
        except Exception:  # the real warm-up compiles it again, and says why it fails
            pass

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(compile_one, found.values()))
    return len(found), time.perf_counter() - started
