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

from kiln import functional as KF
from kiln.runtime.grammar import apply_grammar, grammar_bitmask
from kiln.runtime.request import Request
from kiln.runtime.transfer import to_device


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
    penalties: tuple[torch.Tensor, ...] | None  # see penalty_tensors
    banned: torch.Tensor | None  # [B, V] bool, tokens that may not be sampled
    bias: torch.Tensor | None  # [B, V] float, logit_bias added to the logits
    grammar: tuple[torch.Tensor, list[int]] | None  # json_schema bitmask, constrained rows
    wants_logprobs: bool
    max_logprobs: int  # top-n width over the batch

    @classmethod
    def from_requests(cls, requests: list[Request], vocab_size: int,
                      device: torch.device) -> SamplingBatch:
        ps = [r.params for r in requests]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, device)

        top_k = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in ps]
        needs_penalty = any(p.repetition_penalty != 1 or p.presence_penalty or
                            p.frequency_penalty for p in ps)
        # Two copies a step, not six: the rows of [3, B'] tensors, B' = B rounded up to 4
        # so that every row starts 16-byte aligned as a tensor of its own would (Triton
        # compiles another kernel variant for a pointer that is not).
        n, pad = len(ps), [0] * (-len(ps) % 4)
        floats = tensor([[0.0 if p.greedy else p.temperature for p in ps] + pad,
                         [p.top_p for p in ps] + pad, [p.min_p for p in ps] + pad],
                        torch.float32)
        ints = tensor([top_k + pad, [r.sampling_seed for r in requests] + pad,
                       [len(r.token_ids) - r.num_prompt_tokens for r in requests] + pad],
                      torch.int64)
        return cls(
            temperature=floats[0, :n], top_k=ints[0, :n], top_p=floats[1, :n],
            min_p=floats[2, :n], seeds=ints[1, :n], steps=ints[2, :n],
            all_greedy=all(p.greedy for p in ps),
            penalties=penalty_tensors(requests, vocab_size, device) if needs_penalty else None,
            banned=banned_tokens(requests, vocab_size, device),
            bias=logit_bias(requests, vocab_size, device),
            grammar=grammar_bitmask(requests, vocab_size, device),
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
    return tuple(_pinned_to(t, device) for t in (counts, seen, rep, pres, freq))


def banned_tokens(requests: list[Request], vocab_size: int,
                  device: torch.device) -> torch.Tensor | None:
    """Stop/EOS ids before min_tokens is reached, single-token bad words, and every token
    outside allowed_token_ids. Where these would ban every token of a row (allowed ids that
    are all stop ids before min_tokens), only allowed_token_ids holds."""
    rows: dict[int, tuple[list[int], list[int] | None]] = {}
    for i, r in enumerate(requests):
        min_tokens, allowed = r.params.min_tokens, r.params.allowed_token_ids
        if not (min_tokens or r.bad_words_token_ids or allowed):
            continue  # (most requests: nothing to ban, nothing to compute)
        ids: list[int] = []
        if len(r.token_ids) - r.num_prompt_tokens < min_tokens:
            ids += list(r.params.stop_token_ids)
            if not r.params.ignore_eos:
                ids += list(r.eos_token_ids)
        ids += r.banned_next_tokens()
        if ids or allowed:
            rows[i] = ([t for t in ids if 0 <= t < vocab_size],
                       [t for t in allowed if 0 <= t < vocab_size] if allowed else None)
    if not rows:
        return None
    mask = torch.zeros(len(requests), vocab_size, dtype=torch.bool)
    for i, (ids, allowed) in rows.items():
        if allowed:
            mask[i] = True
            mask[i, allowed] = False
        row = mask[i].clone()
        row[ids] = True
        if not row.all():
            mask[i] = row
    return _pinned_to(mask, device)


def logit_bias(requests: list[Request], vocab_size: int,
               device: torch.device) -> torch.Tensor | None:
    """Each request's logit_bias as a dense row (zeros for requests without one)."""
    if not any(r.params.logit_bias for r in requests):
        return None
    bias = torch.zeros(len(requests), vocab_size, dtype=torch.float32)
    for i, r in enumerate(requests):
        items = [(t, b) for t, b in (r.params.logit_bias or {}).items() if 0 <= t < vocab_size]
        if items:
            ids, values = zip(*items, strict=True)
            bias[i, list(ids)] = torch.tensor(values, dtype=torch.float32)
    return _pinned_to(bias, device)


def _pinned_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


_FLOAT32_MAX = torch.finfo(torch.float32).max


def apply_penalties(logits: torch.Tensor, penalties: tuple[torch.Tensor, ...]) -> torch.Tensor:
    counts, seen, rep, pres, freq = penalties
    # Repetition penalty (CTRL): shrink logits of tokens already seen, towards lower.
    rep = rep[:, None]  # (a tiny penalty must not make several logits +inf: NaN in softmax)
    penalized = torch.where(logits > 0, (logits / rep).clamp_max(_FLOAT32_MAX), logits * rep)
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
    if batch.bias is not None:
        logits = logits + batch.bias
    if batch.grammar is not None:
        logits = apply_grammar(logits, batch.grammar)
        if batch.banned is not None:  # min_tokens / bad words leave the grammar some token
            banned = logits.masked_fill(batch.banned, float("-inf"))
            logits = torch.where(banned.isneginf().all(-1, keepdim=True), logits, banned)
    elif batch.banned is not None:
        logits = logits.masked_fill(batch.banned, float("-inf"))
    if batch.all_greedy:
        tokens = KF.greedy_tokens(logits)
    else:
        tokens = KF.sample_tokens(logits, batch.temperature, batch.top_k, batch.top_p,
                                  batch.min_p, batch.seeds, batch.steps)
    if not batch.wants_logprobs:
        return tokens, None, None
    logprobs = torch.log_softmax(raw, dim=-1)
    top_lp, top_ids = logprobs.topk(batch.max_logprobs, dim=-1)
    sampled_lp = logprobs.gather(1, tokens[:, None])
    return (tokens, torch.cat([sampled_lp, top_lp], 1), torch.cat([tokens[:, None], top_ids], 1))
