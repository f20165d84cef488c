"""Torch reference ops: the CPU path, and the oracle every Triton kernel is tested against.
Numerics follow HuggingFace transformers' Llama (norms in float32, rotary in the model
dtype) so that kiln matches it within dtype tolerance."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.kernels.reference_quant import (  # noqa: F401  (re-exported: ref.quantize_fp8, ...)
    FP8,
    FP8_MAX,
    INT8_MAX,
    MIN_AMAX,
    FP8Act,
    FP8Quant,
    Int8Act,
    Int8Quant,
    dequantize_int_weight,
    dequantize_kv,
    fp8_linear,
    int8_linear,
    int_weight_linear,
    pack_int4,
    quantize_fp8,
    quantize_fp8_per_token,
    quantize_int8_per_token,
    quantize_kv,
    read_kv,
    unpack_int4,
)
from kiln.kernels.reference_sampling import filter_probs, sample_tokens, uniform_noise  # noqa: F401  (re-exported)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * x / sqrt(mean(x^2) + eps), reduced in float32."""
    if x.device.type == "cpu":  # torch's op: the same bits on the CPU, 1 op instead of 6
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, eps)
        return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """r = x + residual; returns (rms_norm(r), r)."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] on the last dim; returns silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] on the last dim; returns gelu(gate, tanh approximation) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def rotary(
    x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, head_dim: int,
    step_cache: dict | None = None,
) -> torch.Tensor:
    """Neox-style rotary on x [T, heads*head_dim]; cos_sin [max_pos, rotary_dim] = [cos|sin].

    Only the first rotary_dim dims of each head rotate (partial rotary, GPT-NeoX / Phi);
    the rest pass through. rotary_dim 0 (learned or no positions) returns x as is.
    step_cache: keeps the rows of cos_sin at `positions` for the step's other layers.
    """
    tokens = x.shape[0]
    rotary_dim = cos_sin.shape[-1]
    if rotary_dim == 0:
        return x.reshape(tokens, -1)
    x = x.view(tokens, -1, head_dim)
    cos, sin = _rotary_rows(positions, cos_sin, x.dtype, step_cache)
    if rotary_dim < head_dim:
        x, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = x.chunk(2, dim=-1)
    # [x1 | x2] * [cos | cos] + [x2 | x1] * [-sin | sin]
    out = x * cos + torch.cat([x2, x1], dim=-1) * sin
    if rotary_dim < head_dim:
        out = torch.cat([out, rest], dim=-1)
    return out.view(tokens, -1)


def _rotary_rows(positions: torch.Tensor, cos_sin: torch.Tensor, dtype: torch.dtype,
                 step_cache: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """([cos | cos], [-sin | sin]) [T, 1, rotary_dim] in dtype, for the rows `positions`
    (rows of _signed_tables; kept in step_cache for the step's other layers)."""
    key = ("rotary", id(cos_sin), id(positions), dtype)
    if step_cache is not None and key in step_cache:
        table, at, rows = step_cache[key]
        if table is cos_sin and at is positions:  # (held: no other tensor takes their ids)
            return rows
    cos, sin = _signed_tables(cos_sin, dtype)
    rows = cos[positions], sin[positions]
    if step_cache is not None:
        step_cache[key] = (cos_sin, positions, rows)
    return rows


def _signed_tables(cos_sin: torch.Tensor, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole table as ([max_pos, 1, d] cos | cos, [max_pos, 1, d] -sin | sin) in dtype,
    built once per table and dtype and kept on the table tensor (they live and die with
    it): rotate_half(x) * sin = [-x2, x1] * [sin, sin] = [x2, x1] * [-sin, sin]."""
    tables = cos_sin.__dict__.setdefault("_kiln_signed_rotary", {})
    if dtype not in tables:
        cos, sin = cos_sin.to(dtype).chunk(2, dim=-1)
        tables[dtype] = (torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None])
    return tables[dtype]


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter k, v [T, kv_heads, head_dim] into caches [blocks, block_size, kv_heads, d]."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = \
        quantize_kv(k, k_scale, k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = \
        quantize_kv(v, v_scale, v_cache.dtype)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_rotary: torch.Tensor | None = None,
    step_cache: dict | None = None,
    kv_finite: bool = False,
) -> torch.Tensor:
    """paged_attention for a decode step (query i is the last token of sequence i), all
    sequences in one batched product: contexts gathered into [B, L, kv_heads, d] padded to
    the longest, the padding (and, with a window, the keys before it) masked, and zeroed
    unless kv_finite (unwritten cache memory may hold NaN, which a zero weight does not
    cancel). Same results as the per-sequence loop."""
    batch, length = len(seq_lens), max(seq_lens)
    blocks, mask, drop, distance = _decode_layout(block_tables, seq_lens, k_cache.shape[1],
                                                  sliding_window, q.device, step_cache)
    k, v = read_kv(k_cache, blocks, length, k_scale, q.dtype), \
        read_kv(v_cache, blocks, length, v_scale, q.dtype)
    if key_rotary is not None:
        k = rotate_cached_keys(k, torch.arange(length, device=q.device), key_rotary)
    if not kv_finite:
        k, v = k.masked_fill(drop, 0), v.masked_fill(drop, 0)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, kv_heads, L, d]
    qh = q.reshape(batch, q.shape[1], 1, q.shape[2])  # [B, heads, 1, d]
    o = _attend(qh, k, v, mask, distance, scale, softcap, alibi_slopes)
    return o.view(batch, q.shape[1], q.shape[2])


def _decode_layout(block_tables: torch.Tensor, seq_lens: list[int], block_size: int,
                   sliding_window: int | None, device: torch.device,
                   step_cache: dict | None) -> tuple[torch.Tensor, ...]:
    """For a batched decode step: the block ids to gather [B, blocks], the keys each query
    sees [B, 1, 1, L], the gathered positions to zero [B, L, 1, 1] and key - query
    positions [B, 1, 1, L] (the same for every layer of the step: kept in step_cache)."""
    key = ("decode", id(block_tables), sliding_window)
    if step_cache is not None and key in step_cache and step_cache[key][0] is block_tables:
        return step_cache[key][1]
    batch, length = len(seq_lens), max(seq_lens)
    blocks = block_tables[:batch, :-(-length // block_size)].long()
    lens = torch.tensor(seq_lens, device=device)
    k_pos = torch.arange(length, device=device)[None, :]
    q_pos = (lens - 1)[:, None]
    mask = k_pos <= q_pos  # [B, L]
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    layout = (blocks, mask[:, None, None, :], ~mask[:, :, None, None],
              (k_pos - q_pos)[:, None, None, :])
    if step_cache is not None:
        step_cache[key] = (block_tables, layout)
    return layout


def _attend(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, mask, distance,
            scale: float, softcap: float | None, alibi_slopes: torch.Tensor | None,
            causal: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale (capped, or + ALiBi) where mask) v, qh [..., heads, Q, d], kh /
    vh [..., kv_heads, L, d]; mask, distance (key - query pos, for ALiBi) to [..., Q, L] or
    None where causal (key <= query, Q = L). 3-D gets a batch dim: only 4-D reaches torch's
    fused CPU kernel (2,000 tokens, 9 heads: 0.48 s as 3-D, 0.10 as 4-D, 0.05 causal)."""
    if qh.dim() == 3:
        return _attend(qh[None], kh[None], vh[None], mask, distance, scale, softcap,
                       alibi_slopes, causal)[0]
    if causal and alibi_slopes is None and softcap is None:
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                              enable_gqa=True)
    if alibi_slopes is not None:
        bias = alibi_slopes.float().view(-1, 1, 1) * distance.float()
        return F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=bias.masked_fill(~mask, float("-inf")).to(qh.dtype),
            scale=scale, enable_gqa=True)
    if softcap is None:
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                              enable_gqa=True)
    group = qh.shape[-3] // kh.shape[-3]
    kh, vh = kh.repeat_interleave(group, -3), vh.repeat_interleave(group, -3)
    # In float32, as the kernels do: capped scores reach |s| ~ c (50 for Gemma 2), where
    # a 16-bit score is off by up to 0.25 before the softmax.
    scores = (qh.float() @ kh.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vh.float()).to(qh.dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: list[int],
    seq_lens: list[int],
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    key_rotary: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context.

    q [T, heads, d] holds the new tokens of all sequences back to back; sequence i owns
    q[query_starts[i]:query_starts[i+1]] and its context is the first seq_lens[i]
    tokens in the blocks block_tables[i]. New tokens are the last ones of the context.
    1-byte caches (e4m3fn, int8) are read as value * k_scale / v_scale [kv_heads].
    sliding_window W: the query at position p sees keys p - W + 1 .. p only.
    softcap c: scores s = (q . k) * scale become c * tanh(s / c) before the softmax.
    alibi_slopes [heads] float32 (ALiBi, Bloom): scores get slope[h] * (key pos - query
    pos) added (the softmax equals Bloom's slope * key pos; relative stays exact longer).
    key_rotary [max_pos, head_dim] (attention sinks): the cache holds keys before rotary;
    key n is rotated at position n (its index in the block list) as it is read.
    """
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    for i, seq_len in enumerate(seq_lens):
        start, end = query_starts[i], query_starts[i + 1]
        num_new = end - start
        # New query j sits at seq_len - num_new + j. With a window, blocks before the first
        # query's window are never read (the KV manager may have released them).
        first = 0 if sliding_window is None else \
            max(seq_len - num_new - sliding_window + 1, 0) // block_size * block_size
        blocks = block_tables[i, first // block_size:-(-seq_len // block_size)].long()
        k = read_kv(k_cache, blocks, seq_len - first, k_scale, q.dtype)
        v = read_kv(v_cache, blocks, seq_len - first, v_scale, q.dtype)
        if key_rotary is not None:
            k = rotate_cached_keys(k, torch.arange(first, seq_len, device=q.device), key_rotary)
        qh, kh, vh = q[start:end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        causal = num_new == seq_len and first == 0 and sliding_window is None
        sees_all = num_new == 1 and sliding_window is None  # a lone query: no mask to build
        mask = distance = None
        if not (causal or sees_all) or softcap is not None or alibi_slopes is not None:
            q_pos = torch.arange(seq_len - num_new, seq_len, device=q.device)[:, None]
            k_pos = torch.arange(first, seq_len, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            distance = k_pos - q_pos if alibi_slopes is not None else None
        o = _attend(qh, kh, vh, mask, distance, scale, softcap, alibi_slopes, causal)
        out[start:end] = o.transpose(0, 1)
    return out


def rotate_cached_keys(k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
                       ) -> torch.Tensor:
    """Rotary on keys read from a cache of unrotated keys: k [..., L, kv_heads, d], key l
    of every leading index at positions[l]. Same values as `rotary` (the table and each
    product in k's dtype); the position tables are built once for all layers of a step."""
    cos, sin = _key_rotary_tables(cos_sin, positions, k.dtype)
    half = k.shape[-1] // 2
    # rotate_half(k) * sin = [-k2, k1] * [sin, sin] = [k2, k1] * [-sin, sin]
    return k * cos + torch.cat([k[..., half:], k[..., :half]], -1) * sin


def _key_rotary_tables(cos_sin: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """_signed_tables at positions (always a run first .. first + L - 1 here): views."""
    cos, sin = _signed_tables(cos_sin, dtype)
    first, count = int(positions[0]), positions.numel()
    return cos[first:first + count], sin[first:first + count]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes [num_heads] float32 (Press et al.; Bloom's recipe): for the largest
    power of two n <= num_heads, 2^(-8 i / n) for i = 1..n, then the odd multiples
    2^(-4 (2j - 1) / n) for the heads beyond n."""
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]
    slopes += [2.0 ** (-4.0 * (2 * j - 1) / n) for j in range(1, num_heads - n + 1)]
    return torch.tensor(slopes, dtype=torch.float32)


def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: (weights float32 [T, k], expert ids int64 [T, k]) from the softmax of
    the router logits [T, E] (in float32); renormalize rescales the k weights to sum 1."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None
              ) -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{ids[t, j]}(x[t]) for SwiGLU experts:
    expert_e(x) = w2[e] (silu(gate) * up), [gate | up] = w13[e] x.

    x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_* [T, k]. One pass per expert that has
    tokens, accumulated in x's dtype (the oracle; the GPU runs kernels.moe).
    FP8 experts (w13_scale [E, 2I], w2_scale [E, H]): W8A8 as kernels.moe computes it, x
    quantized per token, the SiLU*mul output (rounded to x's dtype) per row.
    """
    out = torch.zeros_like(x)
    if w13_scale is not None:
        x_q, x_scale = quantize_fp8_per_token(x)
    for expert in torch.unique(topk_ids).tolist():
        token, slot = torch.where(topk_ids == expert)
        if w13_scale is None:
            h = silu_and_mul(x[token] @ w13[expert].T) @ w2[expert].T
        else:
            up = (x_q[token].float() @ w13[expert].float().T) * x_scale[token] \
                * w13_scale[expert]
            a_q, a_scale = quantize_fp8_per_token(silu_and_mul(up.to(x.dtype)))
            h = (a_q.float() @ w2[expert].float().T) * a_scale * w2_scale[expert]
        out.index_add_(0, token, (h * topk_weights[token, slot, None]).to(x.dtype))
    return out


def rotary_and_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, head_dim: int, k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None, rotate_k: bool = True,
    step_cache: dict | None = None, kv_finite: bool = False,
) -> torch.Tensor:
    """rotary(q); writes rotary(k) and v into the caches at slot_mapping (slots < 0 skipped).

    q [T, heads*head_dim] (or [T, heads, head_dim]), k and v likewise with kv heads;
    returns the rotated q as [T, heads*head_dim]. rotate_k=False writes k unrotated
    (attention sinks). kv_finite: NaN / inf are written as finite numbers (a request
    whose activations overflow leaves nothing in the pool that another request's padded
    gather could turn into NaN).
    """
    tokens = q.shape[0]
    num_kv_heads = k_cache.shape[2]
    if rotate_k:  # q and k in one pass
        q_size = q.reshape(tokens, -1).shape[1]
        qk = torch.cat([q.reshape(tokens, -1), k.reshape(tokens, -1)], dim=1)
        qk = rotary(qk, positions, cos_sin, head_dim, step_cache)
        q_rot, k_rot = qk[:, :q_size], qk[:, q_size:]
    else:
        q_rot = rotary(q.reshape(tokens, -1), positions, cos_sin, head_dim, step_cache)
        k_rot = k.reshape(tokens, -1)
    k_rot = k_rot.reshape(tokens, num_kv_heads, head_dim)
    v = v.reshape(tokens, num_kv_heads, head_dim)
    valid = _valid_slots(slot_mapping, step_cache)
    if valid is not None:
        k_rot, v, slot_mapping = k_rot[valid], v[valid], slot_mapping[valid]
    if kv_finite:  # as 0: the dtype's max (nan_to_num's inf) times a query overflows to
        # inf in a padded gather's masked score, and the mask makes that NaN
        k_rot, v = (torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in (k_rot, v))
    write_kv(k_rot, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q_rot


def _valid_slots(slot_mapping: torch.Tensor, step_cache: dict | None
                 ) -> torch.Tensor | None:
    """The tokens with a slot (>= 0) as a boolean mask, or None when all have one."""
    key = ("valid", id(slot_mapping))
    if step_cache is not None and key in step_cache and step_cache[key][0] is slot_mapping:
        return step_cache[key][1]
    valid = slot_mapping >= 0
    valid = None if bool(valid.all()) else valid
    if step_cache is not None:
        step_cache[key] = (slot_mapping, valid)
    return valid
