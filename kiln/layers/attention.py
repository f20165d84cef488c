"""Paged attention layer and the per-step metadata it reads.

The runtime builds one `AttentionMetadata` per step and enters `forward_context(meta)`
around the model's forward; every attention layer reads it from there. Models never
import the runtime.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from kiln import functional as KF


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and what each sequence attends to.

    Tokens of all sequences are packed back to back (no padding): sequence i owns
    tokens query_start_loc[i]:query_start_loc[i+1], and its context is its first
    seq_lens[i] tokens, held in the KV blocks block_tables[i].
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including new tokens
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    query_starts_host: list[int]
    seq_lens_host: list[int]
    max_query_len: int
    max_seq_len: int
    # The KV pool holds no NaN / inf anywhere (the CPU runtime zeroes it when allocated,
    # and the writes keep it so): the CPU path may then leave the padding it gathers past
    # a context (other requests' blocks, stale slots) as it is.
    kv_finite: bool = False
    # What the CPU path derives from these (rotary rows, masks, gathered block ids): made
    # by the first layer that needs it, reused by the others in the step.
    host_cache: dict = field(default_factory=dict, repr=False, compare=False)


_current: AttentionMetadata | None = None
# While piecewise CUDA graphs are captured (kiln.runtime.piecewise_graphs): the object that
# ends the graph piece at each attention call and runs the attention between pieces.
_splitter = None


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[None]:
    global _current
    previous, _current = _current, meta
    try:
        yield
    finally:
        _current = previous


@contextlib.contextmanager
def split_at_attention(splitter) -> Iterator[None]:
    """Inside: every attention layer hands (itself, q, cos_sin) to splitter.attention(),
    which returns the buffer the attention output will be in, instead of attending."""
    global _splitter
    previous, _splitter = _splitter, splitter
    try:
        yield
    finally:
        _splitter = previous


def current_metadata() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("attention called outside forward_context()")
    return _current


class Attention(nn.Module):
    """Writes this step's K/V into the paged cache, then attends over the whole context.

    `k_cache` / `v_cache` [num_blocks, block_size, kv_heads, head_dim] are bound by the
    model runner after it allocates the KV pool (v_cache [num_blocks, kv_heads, head_dim,
    block_size] where the runner lays V out transposed: model_runner.transposes_v). With a
    1-byte cache (fp8, int8) the layer also holds `k_scale` / `v_scale` [kv_heads] (see
    kiln.layers.quantization).
    `sliding_window` W: each query sees its last W positions only; `softcap` c: scores
    become c * tanh(score / c) (Gemma 2); `alibi_slopes` [heads of this rank]: ALiBi
    biases (Bloom). `rotate_keys` (set by the engine for attention sinks): K is cached
    before rotary and the attention kernels rotate each key by its index in the
    sequence's block list as they read it (kiln.runtime.streaming).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None,
                 alibi_slopes: torch.Tensor | None = None, kv_head_start: int = 0,
                 total_kv_heads: int | None = None) -> None:
        super().__init__()
        # This rank's KV heads among the checkpoint's total_kv_heads, from kv_head_start
        # (tensor parallel; a checkpoint's per-head KV-cache scales are sliced by them).
        self.kv_head_start = kv_head_start
        self.total_kv_heads = total_kv_heads if total_kv_heads is not None else num_kv_heads
        self.sliding_window = sliding_window
        self.softcap = softcap
        # Derived from the config, never stored in the engine.
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.register_parameter("k_scale", None)
        self.register_parameter("v_scale", None)
        self.rotate_keys = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        """q [T, heads*d], k, v [T, kv_heads*d] before rotary; cos_sin the rotary table."""
        meta = current_metadata()
        # One pass: rotate q and k, store k and v in their cache slots.
        q = KF.rotary_and_write_kv(q, k, v, positions, cos_sin, self.k_cache, self.v_cache,
                                   meta.slot_mapping, self.head_dim, self.k_scale,
                                   self.v_scale, rotate_k=not self.rotate_keys,
                                   step_cache=meta.host_cache, kv_finite=meta.kv_finite)
        return self.attend_rotated(q, cos_sin)

    def attend_rotated(self, q: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        """Attention of rotary(q) [T, heads*d], the step's K / V already in the cache."""
        tokens = q.shape[0]
        q = q.view(tokens, self.num_heads, self.head_dim)
        if _splitter is not None:  # a piecewise graph capture: attention runs between pieces
            out = _splitter.attention(self, q, cos_sin)
        else:
            out = self.attend(q, current_metadata(), cos_sin)
        return out.view(tokens, self.num_heads * self.head_dim)

    def fused_qkv(self, qkv_proj: nn.Module, x: torch.Tensor, positions: torch.Tensor,
                  cos_sin: torch.Tensor) -> torch.Tensor | None:
        """rotary(q) [T, heads*d] from the QKV GEMV with the rotary and this step's K / V
        write in its epilogue (kiln.kernels.gemv_swap_rope, KILN_SWAP_ROPE=0: not; one-row
        int4: KILN_INT_ROPE=0: not), or None where it does not take the layer: then qkv_proj and
        forward() as usual."""
        from kiln.layers import swap_input

        route = swap_input.rope_route(qkv_proj, x)
        if route is None or self.rotate_keys or self.k_scale is not None:
            return None
        from kiln.kernels import gemv_swap_rope

        if not gemv_swap_rope.takes(self.head_dim, cos_sin, self.k_cache, x.dtype):
            return None
        return route(gemv_swap_rope.RopeArgs(
            positions.contiguous(), cos_sin, self.k_cache, self.v_cache,
            current_metadata().slot_mapping.contiguous(), self.num_heads, self.num_kv_heads))

    def attend(self, q: torch.Tensor, meta: AttentionMetadata, cos_sin: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of rotated q [T, heads, d] over the cache (K/V already written)."""
        return KF.paged_attention(q, self.k_cache, self.v_cache, meta, self.scale,
                                  self.k_scale, self.v_scale, self.sliding_window, self.softcap,
                                  self.alibi_slopes,
                                  key_rotary=cos_sin if self.rotate_keys else None, out=out)
