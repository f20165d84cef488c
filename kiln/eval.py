"""Model-quality evaluation on the engine: full-sequence logits and perplexity."""

from __future__ import annotations

import math

import torch

from kiln.runtime.engine import LLMEngine
from kiln.runtime.request import Request, SamplingParams
from kiln.runtime.scheduler import ScheduledRequest, SchedulerOutput


def sequence_logits(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """Logits [len, vocab] of every position of one sequence, computed in one step."""
    request = Request("eval", token_ids, SamplingParams(max_tokens=1), 1)
    if not engine.kv.allocate(request, len(token_ids)):
        raise RuntimeError("the KV cache cannot hold this sequence")
    try:
        out = SchedulerOutput([ScheduledRequest(request, len(token_ids), sample=False)])
        return engine.runner.forward_logits(out).cpu()
    finally:
        engine.kv.free(request)


def perplexity(engine: LLMEngine, token_ids: list[int], window: int = 1024) -> float:
    """exp(mean NLL) over non-overlapping windows (each window starts fresh)."""
    nll, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start:start + window]
        if len(chunk) < 2:
            break
        logits = sequence_logits(engine, chunk)
        targets = torch.tensor(chunk[1:])
        nll += torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)
