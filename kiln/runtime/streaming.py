"""Attention sinks (StreamingLLM, Xiao et al. 2023): generation past max_seq_len in
constant memory.

A sequence keeps its first `sinks` tokens (the "attention sinks") and its most recent
`window` tokens; the tokens between are evicted, a whole KV block at a time, as the
sequence grows. As in the paper, positions are positions *in the cache*, not in the text:
keys are cached before rotary, and the attention kernels rotate each key by its index in
the sequence's current block list while they read it (queries are rotated at their own
cache index). Evicting a block is then a block-list edit: no key is ever rewritten, and
the rotary table never needs more rows than the cache holds.

A 1-byte KV cache (fp8, int8) holds the unrotated keys with the engine's per-head scales:
a key's largest rotated value over positions is at least its largest unrotated one (the
rotation turns each pair's magnitude onto one axis at some position), so scales
calibrated on rotated keys cover the unrotated ones.

Granularity: the sinks are whole blocks (`sinks` rounded up to the block size: 4 keeps
the first 16 tokens with 16-token blocks) and the window is whole blocks too, so a query
sees between window and window + block_size - 1 recent tokens (its own block is filling).
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config import EngineConfig
from kiln.errors import KilnError


@dataclass(frozen=True)
class StreamingConfig:
    sinks: int  # tokens asked for, before rounding to blocks
    window: int
    block_size: int

    @property
    def sink_blocks(self) -> int:
        return -(-self.sinks // self.block_size)

    @property
    def window_blocks(self) -> int:
        return -(-self.window // self.block_size)

    @property
    def capacity_blocks(self) -> int:
        """Blocks a sequence holds at most: sinks, window, and the block being filled."""
        return self.sink_blocks + self.window_blocks + 1

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_size

    @property
    def max_chunk(self) -> int:
        """Most new tokens one step may add to a sequence (a prompt longer than that is
        prefilled in chunks, evicting between them): what the window can take in."""
        return self.window_blocks * self.block_size


def streaming_config(config: EngineConfig, sinks: int | None, window: int | None,
                     max_seq_len: int, speculative: bool) -> StreamingConfig | None:
    """The engine's StreamingConfig (None when off), or a KilnError saying what is wrong."""
    if not sinks and not window:
        return None
    if not sinks or sinks < 1:
        raise KilnError("attention_window needs attention_sinks >= 1 (the tokens kept from "
                        "the start; StreamingLLM uses 4)")
    model, build = config.model, config.build
    bs = build.block_size
    stream = StreamingConfig(sinks, window or 0, bs)
    if not window:  # the largest window the rotary table (max_seq_len rows) allows
        stream = StreamingConfig(sinks, max_seq_len - (stream.sink_blocks + 1) * bs, bs)
    problems = []
    if model.position_embedding != "rope" or model.rotary_dim != model.head_dim:
        problems.append("a model whose attention rotates every dimension of each head with "
                        "RoPE (this one uses "
                        + (f"{model.position_embedding} positions)"
                           if model.position_embedding != "rope" else "partial rotary)"))
    if any(model.layer_window(i) for i in range(model.num_layers)):
        problems.append("a model without sliding-window layers of its own")
    scaling = (model.rope_scaling or {}).get("rope_type") or \
        (model.rope_scaling or {}).get("type")
    if scaling in ("longrope", "su"):
        problems.append("a rotary table that does not change with the length (not LongRoPE)")
    if build.pp_size > 1:
        problems.append(f"pp_size 1 (this engine has {build.pp_size} pipeline stages): "
                        "rebuild it with --pp-size 1 (--tp-size works with attention sinks), "
                        "or leave attention sinks off")
    if speculative:
        problems.append("no speculative decoding")
    if stream.window_blocks < 1:
        problems.append(f"a window of at least one block ({bs} tokens)")
    elif stream.capacity_tokens > max_seq_len:
        problems.append(f"sinks + window + one block ({stream.capacity_tokens} tokens) within "
                        f"max_seq_len ({max_seq_len}); lower attention_window or raise "
                        "max_seq_len")
    if problems:
        raise KilnError("attention sinks need " + "; ".join(problems))
    return stream
