"""Prompt logprobs: the logprob of each next prompt token (and the top-n) from a step's
hidden states."""

from __future__ import annotations

import torch

from kiln.runtime.scheduler import SchedulerOutput


def prompt_logprobs(model: torch.nn.Module, out: SchedulerOutput, hidden: torch.Tensor,
                    query_starts: list[int]) -> dict[str, tuple[int, list[dict[int, float]]]]:
    """Logprob of each next prompt token (plus the top-n) at the positions computed."""
    result = {}
    for i, entry in enumerate(out.scheduled):
        r = entry.request
        if r.prompt_logprobs is None:
            continue
        start = r.num_computed_tokens
        end = min(start + entry.num_new_tokens, r.num_prompt_tokens - 1)
        if end <= start:
            continue
        rows = hidden[query_starts[i]:query_starts[i] + end - start]
        logprobs = torch.log_softmax(model.compute_logits(rows), dim=-1)
        targets = torch.tensor(r.token_ids[start + 1:end + 1], device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        top_lp, top_ids = logprobs.topk(r.prompt_logprobs, dim=-1)
        result[r.request_id] = (start, [
            {t: c, **dict(zip(ids, lps))}
            for t, c, ids, lps in zip(targets.tolist(), chosen, top_ids.tolist(),
                                      top_lp.tolist())])
    return result
