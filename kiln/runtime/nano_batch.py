"""A decode step in two halves on two CUDA streams, their attention kernels taking turns.

A big decode step (hundreds of rows) is decode attention, bound by reading the KV cache,
and GEMMs, bound by tensor-core FLOPs, one after the other: the floor in BENCHMARKS.md
adds the two up. Here the batch is cut in two halves, each run through the layers on a
stream of its own, and the attention kernels of the two halves are ordered one after
another (half 0's at layer L, half 1's at layer L, half 0's at layer L + 1, ...): while
one half attends, the other runs its O projection, MLP and next QKV projection. In a
CUDA graph the streams and the ordering are edges of the graph (events recorded and
waited on during capture). The same split on a CPU (no streams) runs the halves one after
the other, which is how its arithmetic is tested.

Opt-in and untimed (KILN_NANO_BATCH=R: decode graphs of R rows and more, R >= 2, even
buckets; single-GPU engines; bf16/fp16/fp32 and FP8 weights, FP8 with halves of 17 rows
and more), pending benchmarks/overlap_probe.py on a GPU.
"""

from __future__ import annotations

import contextlib
import os

import torch

from kiln.errors import KilnError
from kiln.layers import AttentionMetadata, forward_context
from kiln.layers.attention import current_metadata, split_at_attention
from kiln.layers.linear import LinearBase


def min_rows_from_env() -> int:
    """KILN_NANO_BATCH: the smallest decode bucket run in halves (0, the default: off)."""
    text = os.environ.get("KILN_NANO_BATCH", "") or "0"
    if not text.isdigit() or int(text) == 1:
        raise KilnError(f"KILN_NANO_BATCH={text!r}: 0 (off) or a row count >= 2")
    return int(text)


def halve(meta: AttentionMetadata, rows: int) -> list[AttentionMetadata]:
    """The metadata of rows [0, rows / 2) and [rows / 2, rows) of a decode step (one query
    token a sequence, so query_start_loc is 0 .. rows; device tensors sliced, not copied)."""
    assert meta.max_query_len == 1 and rows % 2 == 0, "a decode step of an even row count"
    half = rows // 2
    return [AttentionMetadata(
        slot_mapping=meta.slot_mapping[lo:lo + half],
        block_tables=meta.block_tables[lo:lo + half], seq_lens=meta.seq_lens[lo:lo + half],
        query_start_loc=meta.query_start_loc[:half + 1],
        query_starts_host=meta.query_starts_host[:half + 1],
        seq_lens_host=meta.seq_lens_host[lo:lo + half], max_query_len=1,
        max_seq_len=meta.max_seq_len, kv_finite=meta.kv_finite) for lo in (0, half)]


class NanoBatch:
    """Runs model (a DecoderForCausalLM) over two halves of a decode batch; the attention
    layers call back into `attention` (kiln.layers.attention.split_at_attention)."""

    def __init__(self, model: torch.nn.Module, min_rows: int) -> None:
        self.model = model
        self.min_rows = min_rows
        # The halves' kernels run at once: none may share a workspace between calls. The
        # split-K GEMMs do (one set of arrival counters a device: the FP8 kernel's up to 16
        # rows, the integer kernels'), so FP8 takes halves of 17 rows and more, and the
        # integer formats none.
        methods = {m.method.name for m in model.modules() if isinstance(m, LinearBase)}
        self.min_half = 1 if methods <= {"none"} else 17 if methods <= {"none", "fp8"} \
            else None
        cuda = next(model.parameters()).is_cuda
        self.streams = [torch.cuda.Stream(), torch.cuda.Stream()] if cuda else None
        self.half = 0
        self.last: torch.cuda.Event | None = None  # after the latest attention kernel
        self.events: list[torch.cuda.Event] = []

    def applies(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows runs in halves."""
        return (self.min_half is not None and self.min_rows >= 2 and rows >= self.min_rows
                and rows % 2 == 0 and rows // 2 >= self.min_half)

    def _stream(self, half: int):
        if self.streams is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.streams[half])

    def attention(self, layer: torch.nn.Module, q: torch.Tensor, cos_sin: torch.Tensor
                  ) -> torch.Tensor:
        """One attention kernel, after the previous one (of either half) has finished."""
        if self.streams is None:
            return layer.attend(q, current_metadata(), cos_sin)
        stream = self.streams[self.half]
        if self.last is not None:
            stream.wait_event(self.last)
        out = layer.attend(q, current_metadata(), cos_sin)
        self.last = torch.cuda.Event()
        self.last.record(stream)
        self.events.append(self.last)
        return out

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """The final hidden states [rows, H] of the whole batch, computed in halves."""
        rows = input_ids.shape[0]
        half = rows // 2
        metas = halve(meta, rows)
        parts = [slice(0, half), slice(half, rows)]
        main = torch.cuda.current_stream() if self.streams is not None else None
        if main is not None:
            for s in self.streams:
                s.wait_stream(main)
        states: list[tuple] = [(None, None, False)] * 2
        self.last, self.events = None, []
        with split_at_attention(self):
            for i, layer in enumerate(self.model.model.layers.values()):
                for h in (0, 1):
                    self.half = h
                    with self._stream(h), forward_context(metas[h]):
                        hidden, residual, partial = states[h]
                        if i == 0:
                            hidden, residual = self.model.embed(input_ids[parts[h]],
                                                                positions[parts[h]])
                        hidden, residual = layer(positions[parts[h]], hidden, residual,
                                                 partial)
                        states[h] = (hidden, residual, layer.defer_reduce)
        outs = []
        for h in (0, 1):
            with self._stream(h):
                outs.append(self.model.finish(*states[h]))
        if main is not None:
            for s in self.streams:
                main.wait_stream(s)
        return torch.cat(outs)
