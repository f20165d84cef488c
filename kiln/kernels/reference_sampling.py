"""Torch references for sampling: counter-based uniform noise (a pure function of seed,
step and token, so a sequence samples the same tokens in any batch), the top-k / top-p /
min-p filter and the sampler the Triton kernel is tested against. Re-exported by
kiln.kernels.reference."""

from __future__ import annotations

import torch

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """u[b, v] in [2^-24, 1 - 2^-24], a pure function of (seeds[b], steps[b], v).

    The splitmix64 finaliser's top 23 bits plus one half: exact in float32, so u never
    rounds to 1 and E = -log(u) is never 0 (p / 0 would be inf, or NaN for p = 0, and
    torch.argmax takes NaN as the maximum).
    """
    x = seeds[:, None] * _GOLDEN + steps[:, None] * _MIX1 + torch.arange(
        vocab_size, device=seeds.device, dtype=torch.int64)[None, :]
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 41).float() + 0.5) / float(1 << 23)


def filter_probs(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor) -> torch.Tensor:
    """Zero what min-p, then top-k, then top-p (over what top-k kept) rule out.

    top_k <= 0, top_p >= 1 and min_p <= 0 switch a row's filter off; a row always keeps
    its most likely token.
    """
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    probs = probs.masked_fill(probs < threshold, 0.0)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    k = torch.where(top_k > 0, top_k, probs.shape[-1])[:, None]
    drop = rank >= k
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    cumulative = sorted_probs.cumsum(dim=-1)
    total = cumulative[:, -1:]
    # Keep the smallest prefix whose mass reaches p of what top-k kept.
    drop |= ((cumulative - sorted_probs) >= top_p[:, None] * total) & (top_p[:, None] < 1)
    drop[:, 0] = False
    return probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B] int64, no host sync.

    Rows with temperature <= 0 take the argmax. Others draw from softmax(logits / T)
    after the filters by the exponential race argmax(p / E), E = -log(u) with u the
    counter-based noise of (seed, step, token): p_i / E_i is largest for token i with
    probability p_i, and a seeded request draws the same tokens whatever its batch.
    """
    greedy = logits.argmax(dim=-1)
    t = temperature.clamp_min(1e-5)[:, None]
    probs = filter_probs(torch.softmax(logits.float() / t, dim=-1), top_k, top_p, min_p)
    race = probs / -torch.log(uniform_noise(seeds, steps, logits.shape[-1]))
    return torch.where(temperature > 0, race.argmax(dim=-1), greedy)
