"""Batched sampling with per-request parameters as device tensors, no host sync inside.

Random draws come from a counter-based hash of (request seed, output position, token
id), not from a stateful generator: a request's tokens do not depend on what else is in
the batch, seeded requests are reproducible, and the whole thing runs inside a CUDA
graph. Sampling is an exponential race: argmax(p / E) with E ~ Exp(1) picks token i
with probability p_i, no cumulative sum or multinomial needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.runtime.request import Request

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """u[b, v] in (0, 1), a pure function of (seeds[b], steps[b], v)."""
    x = seeds[:, None] * _GOLDEN + steps[:, None] * _MIX1 + torch.arange(
        vocab_size, device=seeds.device, dtype=torch.int64)[None, :]
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 40).float() + 0.5) / float(1 << 24)


@dataclass
class SamplingBatch:
    """Per-row parameters of the requests that sample this step, on the device."""

    temperature: torch.Tensor  # [B] float; 0 rows are greedy
    top_k: torch.Tensor  # [B] int64; 0 = off
    top_p: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64, output position of the token being drawn
    all_greedy: bool
    needs_top_k_p: bool
    needs_min_p: bool
    penalties: tuple[torch.Tensor, ...] | None  # see penalty_tensors
    banned: torch.Tensor | None  # [B, V] bool, tokens that may not be sampled
    wants_logprobs: bool
    max_logprobs: int  # top-n width over the batch

    @classmethod
    def from_requests(cls, requests: list[Request], vocab_size: int,
                      device: torch.device) -> SamplingBatch:
        ps = [r.params for r in requests]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in ps]
        needs_penalty = any(p.repetition_penalty != 1 or p.presence_penalty or
                            p.frequency_penalty for p in ps)
        return cls(
            temperature=tensor([0.0 if p.greedy else p.temperature for p in ps], torch.float32),
            top_k=tensor(top_k, torch.int64),
            top_p=tensor([p.top_p for p in ps], torch.float32),
            min_p=tensor([p.min_p for p in ps], torch.float32),
            seeds=tensor([r.sampling_seed for r in requests], torch.int64),
            steps=tensor([r.num_output_tokens for r in requests], torch.int64),
            all_greedy=all(p.greedy for p in ps),
            needs_top_k_p=any(k > 0 for k in top_k) or any(p.top_p < 1 for p in ps),
            needs_min_p=any(p.min_p > 0 for p in ps),
            penalties=penalty_tensors(requests, vocab_size, device) if needs_penalty else None,
            banned=banned_tokens(requests, vocab_size, device),
            wants_logprobs=any(p.logprobs is not None for p in ps),
            max_logprobs=max((p.logprobs or 0) for p in ps),
        )


def penalty_tensors(requests: list[Request], vocab_size: int,
                    device: torch.device) -> tuple[torch.Tensor, ...]:
    """(output token counts [B,V], seen-in-prompt-or-output mask [B,V], rep, pres, freq)."""
    counts = torch.zeros(len(requests), vocab_size, dtype=torch.float32)
    seen = torch.zeros(len(requests), vocab_size, dtype=torch.bool)
    for i, r in enumerate(requests):
        out = torch.tensor(r.output_token_ids, dtype=torch.int64)
        counts[i].index_add_(0, out, torch.ones(len(out)))
        seen[i, torch.tensor(r.token_ids, dtype=torch.int64)] = True
    ps = [r.params for r in requests]
    rep = torch.tensor([p.repetition_penalty for p in ps])
    pres = torch.tensor([p.presence_penalty for p in ps])
    freq = torch.tensor([p.frequency_penalty for p in ps])
    return tuple(t.to(device) for t in (counts, seen, rep, pres, freq))


def banned_tokens(requests: list[Request], vocab_size: int,
                  device: torch.device) -> torch.Tensor | None:
    """Stop/EOS ids before min_tokens is reached, and single-token bad words."""
    rows = []
    for r in requests:
        ids: list[int] = []
        if r.num_output_tokens < r.params.min_tokens:
            ids += list(r.params.stop_token_ids)
            if not r.params.ignore_eos:
                ids += list(r.eos_token_ids)
        ids += r.banned_next_tokens()
        rows.append(ids)
    if not any(rows):
        return None
    mask = torch.zeros(len(requests), vocab_size, dtype=torch.bool)
    for i, ids in enumerate(rows):
        mask[i, [t for t in ids if 0 <= t < vocab_size]] = True
    return mask.to(device)


def apply_penalties(logits: torch.Tensor, penalties: tuple[torch.Tensor, ...]) -> torch.Tensor:
    counts, seen, rep, pres, freq = penalties
    # Repetition penalty (CTRL): shrink logits of tokens already seen, towards lower.
    rep = rep[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    # OpenAI presence / frequency penalties on generated tokens.
    return logits - freq[:, None] * counts - pres[:, None] * (counts > 0).float()


def sample(logits: torch.Tensor, batch: SamplingBatch
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """logits [B, V] float32 -> (token ids [B], top logprobs values, ids) with no host sync.

    Logprobs are those of the model's raw distribution (before penalties and
    temperature), as OpenAI reports them; the sampled token's logprob is column 0.
    """
    raw = logits
    if batch.penalties is not None:
        logits = apply_penalties(logits, batch.penalties)
    if batch.banned is not None:
        logits = logits.masked_fill(batch.banned, float("-inf"))
    greedy_tokens = logits.argmax(dim=-1)
    if batch.all_greedy:
        tokens = greedy_tokens
    else:
        temperature = batch.temperature.clamp_min(1e-5)[:, None]
        probs = filter_probs(torch.softmax(logits / temperature, dim=-1), batch)
        noise = uniform_noise(batch.seeds, batch.steps, logits.shape[-1])
        race = probs / -torch.log(noise)
        tokens = torch.where(batch.temperature > 0, race.argmax(dim=-1), greedy_tokens)
    if not batch.wants_logprobs:
        return tokens, None, None
    logprobs = torch.log_softmax(raw, dim=-1)
    top_lp, top_ids = logprobs.topk(batch.max_logprobs, dim=-1)
    sampled_lp = logprobs.gather(1, tokens[:, None])
    return (tokens, torch.cat([sampled_lp, top_lp], 1), torch.cat([tokens[:, None], top_ids], 1))


def filter_probs(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Zero the tokens that top-k, top-p and min-p rule out (rows keep their best token)."""
    if batch.needs_min_p:
        threshold = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    if batch.needs_top_k_p:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
        k = torch.where(batch.top_k > 0, batch.top_k, probs.shape[-1])[:, None]
        drop = rank >= k
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        # top-p over what top-k kept, renormalized: keep the smallest prefix reaching p.
        cumulative = sorted_probs.cumsum(dim=-1)
        total = cumulative[:, -1:]
        drop |= (cumulative - sorted_probs) >= batch.top_p[:, None] * total
        drop[:, 0] = False
        probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs
