"""Decode steps as CUDA graph replays, one graph per batch-size bucket.

Captured once at engine load. A decode step (one new token per sequence) copies its
inputs into static buffers, pads the batch to the next bucket and replays the graph:
one launch for the whole forward and the LM head, nothing synced with the host. Padded
rows write their K/V into a scratch block nobody owns and attend to nothing real.

A pipeline stage graphs its own layers: a stage after the first receives the previous
stage's (hidden, residual) rows into static buffers before the replay, a stage before
the last sends its output rows after it (the point-to-point transfers stay outside the
graph, two NCCL calls a step); only the last stage computes logits.
"""

from __future__ import annotations

import logging
import time

import torch

from kiln.distributed.comm import pp_recv_into, pp_send
from kiln.layers import AttentionMetadata, forward_context

log = logging.getLogger(__name__)


def batch_buckets(max_batch_size: int) -> list[int]:
    small = [1, 2, 4, 8]
    return sorted({b for b in small if b < max_batch_size} |
                  set(range(16, max_batch_size, 16)) | {max_batch_size})


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_blocks_per_seq: int,
                 block_size: int, scratch_block: int, device: torch.device,
                 prev_rank: int | None = None, next_rank: int | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        """prev_rank / next_rank: the neighbouring pipeline stages' ranks (None: this
        stage is the first / the last); dtype: the activations' (the model's dtype)."""
        self.model = model
        self.prev_rank, self.next_rank = prev_rank, next_rank
        self.buckets = batch_buckets(max_batch_size)
        self.block_size = block_size
        self.max_blocks = max_blocks_per_seq
        self.scratch_slot = scratch_block * block_size
        n = self.buckets[-1]
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=device)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, **i32)
        self.seq_lens = torch.ones(n, **i32)
        self.query_start_loc = torch.arange(n + 1, **i32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # the last stage's outputs
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # an earlier stage's
        self.intermediate = None
        if prev_rank is not None:  # (hidden, residual) from the previous stage
            hidden = model.config.hidden_size
            self.intermediate = tuple(torch.zeros(n, hidden, dtype=dtype, device=device)
                                      for _ in range(2))

    def _stage_forward(self, bs: int) -> None:
        args = (self.input_ids[:bs], self.positions[:bs])
        if self.intermediate is not None:
            args += (tuple(t[:bs] for t in self.intermediate),)
        out = self.model(*args)
        if self.next_rank is None:
            self.logits[bs] = self.model.compute_logits(out)
        else:
            self.outputs[bs] = out

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs], query_start_loc=self.query_start_loc[:bs + 1],
            query_starts_host=[], seq_lens_host=[], max_query_len=1,
            max_seq_len=self.max_blocks * self.block_size)

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket, largest first so smaller ones reuse its memory pool."""
        started = time.perf_counter()
        pool = None
        for bs in reversed(self.buckets):
            meta = self._meta(bs)
            with forward_context(meta):
                for _ in range(2):  # warm up: compile kernels, settle allocations
                    self._stage_forward(bs)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._stage_forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        return time.perf_counter() - started

    def can_run(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.buckets[-1] and max_blocks <= self.max_blocks

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
            ) -> torch.Tensor | None:
        """Logits [num_seqs, vocab] of a decode step whose tensors are already on device
        (None on a pipeline stage before the last, which sends its rows on instead)."""
        n = input_ids.shape[0]
        bs = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[n:bs].fill_(self.scratch_slot)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[n:bs].fill_(1)
        self.block_tables[n:bs, 0].fill_(self.scratch_slot // self.block_size)
        if self.intermediate is not None:
            pp_recv_into(tuple(t[:n] for t in self.intermediate), self.prev_rank)
        self.graphs[bs].replay()
        if self.next_rank is not None:
            pp_send(tuple(t[:n] for t in self.outputs[bs]), self.next_rank)
            return None
        return self.logits[bs][:n]
