"""The runtime settings of an engine checked against what it was built for, before
anything loads: a mistake is one line, and a multi-rank engine finds it before it starts
its other ranks (each of which would find it again)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.config import EngineConfig
from kiln.errors import KilnError
from kiln.runtime.config import RuntimeConfig
from kiln.runtime.streaming import StreamingConfig, streaming_config


@dataclass(frozen=True)
class Limits:
    max_seq_len: int
    max_batch_size: int
    max_num_tokens: int
    streaming: StreamingConfig | None  # attention sinks, when on


def runtime_limits(engine_dir: Path, config: EngineConfig, runtime: RuntimeConfig,
                   speculative: bool) -> Limits:
    """The engine's limits under `runtime`, or a KilnError saying what is wrong."""
    build = config.build
    max_seq_len = runtime.max_seq_len or build.max_seq_len
    if max_seq_len > build.max_seq_len:
        raise KilnError(f"max_seq_len {max_seq_len} exceeds the {build.max_seq_len} "
                        f"{engine_dir} was built for; rebuild it with --max-seq-len "
                        f"{max_seq_len}")
    streaming = streaming_config(config, runtime.attention_sinks, runtime.attention_window,
                                 max_seq_len, speculative)
    max_num_tokens = runtime.max_num_tokens or build.max_num_tokens
    if not runtime.enable_chunked_prefill and max_num_tokens < max_seq_len:
        raise KilnError(f"without chunked prefill, max_num_tokens ({max_num_tokens}) must "
                        f"be at least max_seq_len ({max_seq_len}) or long prompts "
                        "could never be scheduled")
    if runtime.num_kv_blocks is not None:
        check_kv_blocks(runtime.num_kv_blocks, max_seq_len, build.block_size)
    return Limits(max_seq_len, runtime.max_batch_size or build.max_batch_size,
                  max_num_tokens, streaming)


def check_kv_blocks(num_blocks: int, max_seq_len: int, block_size: int) -> None:
    min_blocks = -(-max_seq_len // block_size)
    if num_blocks < min_blocks:
        raise KilnError(f"num_kv_blocks={num_blocks} cannot hold one request of "
                        f"max_seq_len={max_seq_len}; need at least {min_blocks}")
