"""Sampling from logits with per-row temperature, top-k, top-p and min-p, without a sort.

One program per row. Every filter keeps the tokens whose weight w = p / p_max is above a
threshold, so the kept set is {y <= theta} for the surprisal y = -log2(w) = (m - l) / T
* log2(e). theta is found by bisection on the float's bits (exact: the k-th smallest y,
or the smallest y whose mass reaches p of the total), over a short candidate list when a
histogram of y shows that few tokens can be in the kept set, else over the whole row.
The draw is the exponential race argmax(w / E) with E = -log(u) and u the same
counter-based hash noise as the torch reference, so both pick the same token (up to
ties). No host sync: greedy rows (temperature 0) are decided inside the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
NUM_BINS = 128  # histogram of y in half-bit bins; the last one takes everything beyond
CANDIDATES = 16384  # 64 KB of scratch per row; beyond that the search reads the whole row


@triton.jit
def _surprisal(src, offs, n, m, c, min_p, FROM_LOGITS: tl.constexpr):
    """(y, w, ok) of elements offs: y = (m - l) * c from logits, or y itself from the
    candidate list; w = 2^-y; ok = in range and not removed by min-p (w >= min_p)."""
    in_range = offs < n
    if FROM_LOGITS:
        logit = tl.load(src + offs, mask=in_range, other=float("-inf")).to(tl.float32)
        y = (m - logit) * c
    else:
        y = tl.load(src + offs, mask=in_range, other=float("inf"))
    w = tl.exp2(-y)
    return y, w, in_range & (w >= min_p)


@triton.jit
def _bin(y, NUM_BINS: tl.constexpr):
    """Histogram bin of y: floor(2y), the last bin taking y >= (NUM_BINS - 1) / 2 and inf."""
    return tl.minimum((tl.minimum(y, NUM_BINS) * 2.0).to(tl.int32), NUM_BINS - 1)


@triton.jit
def _count_mass(src, n, theta, m, c, min_p, FROM_LOGITS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Number and total weight of the ok elements with y <= theta."""
    count = tl.zeros([BLOCK_V], tl.int32)
    mass = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, n, BLOCK_V):  # per-lane sums: no reduction inside the loop
        y, w, ok = _surprisal(src, v0 + tl.arange(0, BLOCK_V), n, m, c, min_p, FROM_LOGITS)
        sel = ok & (y <= theta)
        count += sel.to(tl.int32)
        mass += tl.where(sel, w, 0.0)
    return tl.sum(count, axis=0), tl.sum(mass, axis=0)


@triton.jit
def _threshold(src, n, m, c, min_p, top_k, top_p, need_k, need_p, total, k_lo, p_lo, hi_bits,
               FROM_LOGITS: tl.constexpr, BLOCK_V: tl.constexpr):
    """theta = min(theta_k, theta_p), searched on float bits: theta_k in [k_lo, hi_bits],
    theta_p in [p_lo, theta_k].

    theta_k: smallest t with count(y <= t) >= k. theta_p: smallest t <= theta_k with
    mass(y <= t) >= p * mass(y <= theta_k) (top-p over what top-k kept, renormalised).
    """
    hi = hi_bits
    if need_k:
        lo = k_lo
        while lo < hi:
            mid = lo + (hi - lo) // 2
            count, _ = _count_mass(src, n, mid.to(tl.float32, bitcast=True), m, c, min_p,
                                   FROM_LOGITS, BLOCK_V)
            hit = count >= top_k
            hi = tl.where(hit, mid, hi)
            lo = tl.where(hit, lo, mid + 1)
        _, total = _count_mass(src, n, hi.to(tl.float32, bitcast=True), m, c, min_p,
                               FROM_LOGITS, BLOCK_V)
    if need_p:
        target = top_p * total
        lo = tl.minimum(p_lo, hi)
        while lo < hi:
            mid = lo + (hi - lo) // 2
            _, mass = _count_mass(src, n, mid.to(tl.float32, bitcast=True), m, c, min_p,
                                  FROM_LOGITS, BLOCK_V)
            hit = mass >= target
            hi = tl.where(hit, mid, hi)
            lo = tl.where(hit, lo, mid + 1)
    return hi.to(tl.float32, bitcast=True)


@triton.jit
def _sample_kernel(
    logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seeds_ptr, steps_ptr,
    out_ptr, cand_ptr, theta_ptr, vocab, stride_row,
    GOLDEN: tl.constexpr, MIX1: tl.constexpr, MIX2: tl.constexpr,
    BLOCK_V: tl.constexpr, NUM_BINS: tl.constexpr, CANDIDATES: tl.constexpr,
    STORE_THETA: tl.constexpr,
):
    """token = argmax_v [y_v <= theta] w_v / -log(u_v), or argmax_v l_v if temperature <= 0.

    Loops keep per-lane running values and reduce once at the end, so each pass streams.
    """
    row = tl.program_id(0)
    src = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK_V)
    # Pass 1: max logit and its first index (the greedy token).
    lane_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    lane_arg = tl.zeros([BLOCK_V], tl.int32)
    for v0 in range(0, vocab, BLOCK_V):
        logit = tl.load(src + v0 + offs, mask=v0 + offs < vocab, other=float("-inf"))
        better = logit.to(tl.float32) > lane_max
        lane_arg = tl.where(better, v0 + offs, lane_arg)
        lane_max = tl.where(better, logit.to(tl.float32), lane_max)
    m = tl.max(lane_max, axis=0)
    best = tl.min(tl.where(lane_max == m, lane_arg, vocab), axis=0)
    temperature = tl.load(temperature_ptr + row)
    if temperature <= 0:
        tl.store(out_ptr + row, best.to(tl.int64))
        return
    c = 1.4426950408889634 / tl.maximum(temperature, 1e-5)
    min_p = tl.load(min_p_ptr + row)
    top_k = tl.load(top_k_ptr + row).to(tl.int32)
    top_p = tl.load(top_p_ptr + row)

    theta = tl.full([], float("inf"), tl.float32)
    if ((top_k > 0) & (top_k < vocab)) | (top_p < 1.0):
        # Pass 2: total weight and a histogram of y (half-bit bins) of the min-p survivors.
        lane_total = tl.zeros([BLOCK_V], tl.float32)
        hist = tl.zeros([NUM_BINS], tl.int32)
        for v0 in range(0, vocab, BLOCK_V):
            y, w, ok = _surprisal(src, v0 + offs, vocab, m, c, min_p, True)
            lane_total += tl.where(ok, w, 0.0)
            hist += tl.histogram(_bin(y, NUM_BINS), NUM_BINS, mask=ok)
        total = tl.sum(lane_total, axis=0)
        need_k = (top_k > 0) & (top_k < tl.sum(hist, axis=0))
        need_p = top_p < 1.0
        # First bin b such that bins <= b surely hold the kept set: by count for top-k;
        # for top-p alone, when an upper bound of the mass above b (each w in bin j is at
        # most 2^(-j/2)) leaves p of the total below, with a margin for rounding.
        ids = tl.arange(0, NUM_BINS)
        cum_count = tl.cumsum(hist, axis=0)
        high_mass = hist.to(tl.float32) * tl.exp2(-ids * 0.5)
        tail_high_mass = tl.cumsum(high_mass, axis=0, reverse=True) - high_mass
        covers = tl.where(need_k, cum_count >= top_k,
                          tail_high_mass <= (1.0 - top_p) * total * 0.999)
        cover_bin = tl.min(tl.where(covers | (ids == NUM_BINS - 1), ids, NUM_BINS), axis=0)
        num_cand = tl.sum(tl.where(ids == cover_bin, cum_count, 0), axis=0)
        k_lo = (cover_bin * 0.5).to(tl.int32, bitcast=True)
        hi_bits = ((cover_bin + 1) * 0.5).to(tl.int32, bitcast=True)
        hi_bits = tl.where(cover_bin == NUM_BINS - 1, 0x7F800000, hi_bits)
        # top-p alone: theta_p is not below the first bin whose upper-bound mass covers.
        cum_high_mass = tl.cumsum(high_mass, axis=0)
        p_bin = tl.min(tl.where(cum_high_mass >= top_p * total, ids, NUM_BINS - 1), axis=0)
        p_lo = tl.where(need_k, 0, (p_bin * 0.5).to(tl.int32, bitcast=True))
        if num_cand <= CANDIDATES:
            # Gather the candidates' y (bins <= cover_bin) and search over them only.
            cand = cand_ptr + row.to(tl.int64) * CANDIDATES
            filled = tl.zeros([], tl.int32)
            for v0 in range(0, vocab, BLOCK_V):
                y, w, ok = _surprisal(src, v0 + offs, vocab, m, c, min_p, True)
                sel = ok & (_bin(y, NUM_BINS) <= cover_bin)
                slot = filled + tl.cumsum(sel.to(tl.int32), axis=0) - 1
                tl.store(cand + slot, y, mask=sel)
                filled += tl.sum(sel.to(tl.int32), axis=0)
            tl.debug_barrier()
            theta = _threshold(cand, num_cand, m, c, min_p, top_k, top_p, need_k, need_p,
                               total, k_lo, p_lo, hi_bits, False, BLOCK_V)
        else:
            theta = _threshold(src, vocab, m, c, min_p, top_k, top_p, need_k, need_p,
                               total, k_lo, p_lo, hi_bits, True, BLOCK_V)
    if STORE_THETA:
        tl.store(theta_ptr + row, theta)

    # Pass 3: the exponential race over the kept tokens. u in [2^-24, 1 - 2^-24] is exact
    # in float32 (23 bits + 1/2), so E = -log(u) > 0.
    seed = tl.load(seeds_ptr + row).to(tl.uint64, bitcast=True)
    step = tl.load(steps_ptr + row).to(tl.uint64, bitcast=True)
    key = seed * GOLDEN + step * MIX1
    lane_score = tl.full([BLOCK_V], -1.0, tl.float32)
    lane_arg = tl.zeros([BLOCK_V], tl.int32)
    for v0 in range(0, vocab, BLOCK_V):
        y, w, ok = _surprisal(src, v0 + offs, vocab, m, c, min_p, True)
        x = key + (v0 + offs).to(tl.uint64)
        x = (x ^ (x >> 30)) * MIX1
        x = (x ^ (x >> 27)) * MIX2
        x = x ^ (x >> 31)
        u = ((x >> 41).to(tl.float32) + 0.5) / 8388608.0
        score = tl.where(ok & (y <= theta), w / -tl.log(u), -1.0)
        better = score > lane_score
        lane_arg = tl.where(better, v0 + offs, lane_arg)
        lane_score = tl.where(better, score, lane_score)
    top = tl.max(lane_score, axis=0)
    best = tl.min(tl.where(lane_score == top, lane_arg, vocab), axis=0)
    tl.store(out_ptr + row, best.to(tl.int64))


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
    candidates: int = CANDIDATES, block_v: int | None = None, num_warps: int | None = None,
    theta_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B] int64; per-row parameter tensors [B] on the device.

    temperature <= 0: greedy. top_k <= 0 or >= V, top_p >= 1, min_p <= 0: filter off.
    theta_out [B] float32 (for tests): receives each sampled row's cut, the kept tokens
    being those with (max_logit - logit) * log2(e) / T <= theta and not cut by min-p.
    """
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    assert logits.stride(-1) == 1
    block_v = block_v or min(4096, triton.next_power_of_2(vocab))
    # The kernel reads row i of each parameter at offset i (no-op if contiguous already).
    temperature, top_k, top_p, min_p, seeds, steps = (
        t.contiguous() for t in (temperature, top_k, top_p, min_p, seeds, steps))
    cand = torch.empty(rows, candidates, dtype=torch.float32, device=logits.device)
    _sample_kernel[(rows,)](
        logits, temperature, top_k, top_p, min_p, seeds, steps, out, cand,
        theta_out if theta_out is not None else cand, vocab, logits.stride(0),
        GOLDEN=_GOLDEN, MIX1=_MIX1, MIX2=_MIX2, BLOCK_V=block_v, NUM_BINS=NUM_BINS,
        CANDIDATES=candidates, STORE_THETA=theta_out is not None,
        num_warps=num_warps or (8 if block_v >= 4096 else 4),
    )
    return out


# ---- greedy: argmax over the vocabulary in chunks -------------------------------------
# torch's argmax reduces a row in one thread block: 27.6 us a decode step for one row of
# 128,256 float32 logits on an H200, 93 us for 496 rows (27th session, BENCHMARKS.md).
ARGMAX_CHUNK = 4096


@triton.jit
def _argmax_chunk_kernel(logits_ptr, val_ptr, idx_ptr, vocab, stride_row,
                         CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    """(row, chunk): the chunk's largest logit and its first index (NaN counts as the
    largest, as in torch.argmax)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab
    v = tl.load(logits_ptr + row.to(tl.int64) * stride_row + offs, mask=mask,
                other=float("-inf")).to(tl.float32)
    v = tl.where(v != v, float("inf"), v)
    top = tl.max(v, axis=0)
    first = tl.min(tl.where(mask & (v == top), offs, vocab), axis=0)
    tl.store(val_ptr + row * CHUNKS + chunk, top)
    tl.store(idx_ptr + row * CHUNKS + chunk, first)


@triton.jit
def _argmax_merge_kernel(val_ptr, idx_ptr, out_ptr, vocab, CHUNKS: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """row: the chunks' largest value, the first chunk holding it (chunks are in order)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < CHUNKS
    v = tl.load(val_ptr + row * CHUNKS + offs, mask=mask, other=float("-inf"))
    i = tl.load(idx_ptr + row * CHUNKS + offs, mask=mask, other=vocab)
    top = tl.max(v, axis=0)
    first = tl.min(tl.where(mask & (v == top), i, vocab), axis=0)
    tl.store(out_ptr + row, tl.minimum(first, vocab - 1).to(tl.int64))


def greedy_tokens(logits: torch.Tensor, chunk: int = ARGMAX_CHUNK) -> torch.Tensor:
    """logits [B, V] (any float dtype) -> argmax [B] int64, the first index of the largest
    value as torch.argmax returns it; two launches, the row split over V / chunk programs."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    assert logits.stride(-1) == 1 and vocab > 0
    block = min(chunk, triton.next_power_of_2(vocab))
    chunks = triton.cdiv(vocab, block)
    val = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    _argmax_chunk_kernel[(rows, chunks)](logits, val, idx, vocab, logits.stride(0),
                                         CHUNKS=chunks, BLOCK=block,
                                         num_warps=8 if block >= 4096 else 4)
    _argmax_merge_kernel[(rows,)](val, idx, out, vocab, CHUNKS=chunks,
                                  BLOCK_C=triton.next_power_of_2(chunks), num_warps=1)
    return out
