"""RuntimeConfig: the knobs chosen when an engine is loaded (the build fixed the rest)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import KilnError


@dataclass(frozen=True)
class RuntimeConfig:
    """Knobs chosen when an engine is loaded (the build fixed the rest)."""

    device: str = "auto"  # auto: cuda if available, else cpu
    num_kv_blocks: int | None = None  # None: sized from memory
    kv_cache_memory_fraction: float = 0.9  # of free GPU memory, after weights
    cpu_kv_cache_bytes: int = 1 << 30
    scheduler_policy: str = "max_utilization"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    cuda_graphs: bool = True  # capture decode graphs at load (CUDA only)
    # With cuda_graphs: a step that only prefills one prompt of up to this many tokens
    # replays a prefill graph (0: eager), capped by max_num_tokens and max_seq_len.
    prefill_graph_tokens: int = 2048
    # piecewise_graphs: any other step of up to that many tokens (prompts and decodes
    # mixed) also replays graph pieces, the attention launched between them. Off by
    # default: no offline-throughput gain measured (H200, BENCHMARKS.md, eleventh session).
    piecewise_graphs: bool = False
    # Schedule and launch step N+1 before step N's tokens reach the host, so the CPU work
    # of a step hides behind the GPU's. None: on for CUDA, off on the CPU (no gain there).
    overlap_scheduling: bool | None = None
    # Runtime limits: an engine serves any of them up to what it was built for, so one
    # built engine serves every combination (None: the build's).
    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    max_seq_len: int | None = None  # at most the built max_seq_len
    # TP engines on CUDA: small all-reduces through kiln's one-shot NVLink kernel (fused
    # with the residual add + RMSNorm after it) instead of NCCL. None: on where symmetric
    # memory works (else NCCL, with a log line); False: NCCL for every all-reduce.
    custom_all_reduce: bool | None = None
    # Pipeline-parallel engines: micro-batches in flight (None: pp_size). One more than
    # the stages gives the host a stage's time to apply a micro-batch's tokens and launch
    # the next before a stage idles, at the cost of smaller micro-batches.
    pipeline_depth: int | None = None
    # Speculative decoding (kiln.runtime.speculative): a dict of vLLM's keys, e.g.
    # {"method": "ngram", "num_speculative_tokens": 4}, or a JSON string of one.
    speculative_config: Any = None
    # Attention sinks (StreamingLLM, kiln.runtime.streaming): keep the first
    # attention_sinks tokens and the last attention_window (0: what max_seq_len leaves) of
    # every sequence, so generation runs past max_seq_len in constant memory. 0: off.
    attention_sinks: int = 0
    attention_window: int = 0

    def __post_init__(self) -> None:
        resolve_device(self.device)  # a device this machine lacks fails before any build
        for name, low in (("max_batch_size", 1), ("max_num_tokens", 1), ("max_seq_len", 1),
                          ("num_kv_blocks", 1), ("pipeline_depth", 1),
                          ("prefill_graph_tokens", 0), ("attention_sinks", 0),
                          ("attention_window", 0), ("cpu_kv_cache_bytes", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < low):
                raise KilnError(f"{name} must be a whole number >= {low}, got {value!r}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise KilnError("kv_cache_memory_fraction must be in (0, 1], got "
                            f"{self.kv_cache_memory_fraction}")


def resolve_device(name: str) -> str:
    """The device kiln runs on for `name` ("auto": cuda when a GPU is visible, else
    cpu; "cpu", "cuda", "cuda:N"), or a KilnError saying what is wrong."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise KilnError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu" and device.index is None:
        return name
    if device.type != "cuda":
        raise KilnError(f"kiln runs on NVIDIA GPUs (cuda, cuda:N) and the CPU, not {name!r}")
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else \
            "torch sees no CUDA GPU (driver, CUDA_VISIBLE_DEVICES?)"
        raise KilnError(f"device {name!r} asked for, but {why}; use --device cpu (or auto)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise KilnError(f"device {name!r} asked for, but {torch.cuda.device_count()} GPUs "
                        "are visible (cuda:0 is the first)")
    return name
