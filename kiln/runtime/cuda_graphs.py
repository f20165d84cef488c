"""Decode steps (and a lone prompt's prefill) as CUDA graph replays, one graph per bucket.

Captured once at engine load. A decode step (one new token per sequence) copies its
inputs into static buffers, pads the batch to the next bucket (or to a larger one whose
graph was timed faster at load: route_buckets) and replays the graph: one launch for the
whole forward and the LM head, nothing synced with the host. Padded
rows write their K/V into a scratch block nobody owns and attend to nothing real.

A pipeline stage graphs its own layers: a stage after the first receives the previous
stage's (hidden, residual) rows into static buffers before the replay, a stage before
the last sends its output rows after it (the point-to-point transfers stay outside the
graph, two NCCL calls a step); only the last stage computes logits.

A step that only prefills one prompt (the first token of a request that arrives at an idle
engine: what TTFT measures) replays a prefill graph of the next token-count bucket
(PrefillGraphs): launched eagerly, a 1000-token prefill of an 8B FP8 model spends about
twice as long in the host's ~330 kernel launches as the GPU spends running them.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from kiln.distributed.comm import pp_recv_into, pp_send
from kiln.layers import AttentionMetadata, forward_context

log = logging.getLogger(__name__)


# A batch may replay a larger bucket's graph when that one runs faster: cuBLAS's choice
# of GEMM tiles makes a step's time uneven in its rows (an 8B FP8 layer's four linears on
# an H200: 195 us at 296 rows, 160 at 384; 226 at 448, 182 at 512). The buckets are timed
# once, after capture; KILN_GRAPH_ROUTE=0 keeps every batch on its own bucket.
ROUTE = os.environ.get("KILN_GRAPH_ROUTE", "1") != "0"
ROUTE_MARGIN = 0.03  # a larger bucket must be this much faster (timing noise: ~1%)
ROUTE_MIN_MS = 0.1  # and by this much: a small model's buckets all take about the same time


def batch_buckets(max_batch_size: int) -> list[int]:
    small = [1, 2, 4, 8]
    return sorted({b for b in small if b < max_batch_size} |
                  set(range(16, max_batch_size, 16)) | {max_batch_size})


def route_buckets(times: dict[int, float], margin: float = ROUTE_MARGIN,
                  min_ms: float = ROUTE_MIN_MS) -> dict[int, int]:
    """Bucket -> the bucket to replay for it. Where the fastest larger bucket beats the
    bucket's own time by more than `margin` and `min_ms`, the smallest larger bucket within
    `margin` of that fastest one (the least padding, and the same choice from load to load
    when two are as fast); else the bucket itself."""
    order = sorted(times)
    route: dict[int, int] = {}
    for i, b in enumerate(order):
        larger = order[i + 1:]
        best = min((times[c] for c in larger), default=times[b])
        if best < times[b] * (1 - margin) and times[b] - best > min_ms:
            route[b] = next(c for c in larger if times[c] <= best * (1 + margin))
        else:
            route[b] = b
    return route


def describe_routes(routes: list[dict]) -> str:
    """routes_report()["graph_routes"] in a line."""
    return ", ".join(f"batches {r['batches'][0]}-{r['batches'][1]} -> {r['replays']} "
                     f"({r['ms']:.2f} -> {r['replay_ms']:.2f} ms)" for r in routes)


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
        self.route: dict[int, int] = {}  # bucket -> the bucket replayed (route_buckets)
        self.replay_ms: dict[int, float] = {}
        # The last stage's outputs: views of one float32 buffer, allocated outside the
        # graphs' pool (kept per bucket, they would hold sum(buckets) rows of the vocab:
        # 4.3 GB for Llama-3 at a max batch of 512).
        self.logits: dict[int, torch.Tensor] = {}
        self.logits_buffer: torch.Tensor | None = None
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
            if self.logits_buffer is None:  # the largest bucket's warm-up, outside a graph
                rows = self.model.compute_logits(out[:1])
                self.logits_buffer = rows.new_empty(self.buckets[-1], rows.shape[1])
            self.logits[bs] = self.model.compute_logits(out, out=self.logits_buffer[:bs])
        else:
            self.outputs[bs] = out

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs], query_start_loc=self.query_start_loc[:bs + 1],
            query_starts_host=[], seq_lens_host=[], max_query_len=1,
            max_seq_len=self.max_blocks * self.block_size)

    @torch.inference_mode()
    def capture(self, pool: tuple | None = None) -> float:
        """Capture every bucket, largest first so smaller ones reuse its memory pool (or
        the pool given: graphs replayed one at a time on one stream may share one)."""
        started = time.perf_counter()
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
        self.pool = pool
        torch.cuda.synchronize()
        # Ranks of a parallel engine must replay the same bucket (their collectives match
        # rows), and their timings differ: one process only until routes are agreed on.
        if ROUTE and self.prev_rank is None and self.next_rank is None and not (
                torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            self.replay_ms = self.time_replays()
            self.route = route_buckets(self.replay_ms)
            if self.route != {b: b for b in self.buckets}:
                log.info("decode graphs replayed for faster buckets: %s",
                         describe_routes(self.routes_report()["graph_routes"]))
        return time.perf_counter() - started

    def time_replays(self, rounds: int = 3) -> dict[int, float]:
        """Median replay time of each bucket's graph in ms, the buckets taken in turn each
        round (clock drift spreads over all), after one untimed round. The static inputs
        are the capture's: every row attends to one token, so the times are the step's
        parts that grow with rows (the linears, the LM head, the small kernels)."""
        events = {b: [] for b in self.buckets}
        for r in range(rounds + 1):
            for b in self.buckets:
                start, end = torch.cuda.Event(enable_timing=True), \
                    torch.cuda.Event(enable_timing=True)
                start.record()
                self.graphs[b].replay()
                end.record()
                if r:
                    events[b].append((start, end))
        torch.cuda.synchronize()
        return {b: sorted(s.elapsed_time(e) for s, e in pairs)[rounds // 2]
                for b, pairs in events.items()}

    def moved_batches(self) -> list[tuple[int, int, int]]:
        """(first batch, last batch, bucket replayed) for every bucket routed elsewhere."""
        out, below = [], 0
        for b in self.buckets:
            if self.route.get(b, b) != b:
                out.append((below + 1, b, self.route[b]))
            below = b
        return out

    def routes_report(self) -> dict:
        """The batches that replay a larger bucket's graph (with both replay times) and
        every bucket's replay ms, as kiln bench records them; {} where none were timed."""
        ms = self.replay_ms
        if not ms:
            return {}
        return {"graph_routes": [{"batches": [lo, hi], "replays": to, "ms": round(ms[hi], 3),
                                  "replay_ms": round(ms[to], 3)}
                                 for lo, hi, to in self.moved_batches()],
                "graph_replay_ms": {str(b): round(t, 3) for b, t in sorted(ms.items())}}

    def can_run(self, num_seqs: int, max_blocks: int) -> bool:
        return num_seqs <= self.buckets[-1] and max_blocks <= self.max_blocks

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
            ) -> torch.Tensor | None:
        """Logits [num_seqs, vocab] of a decode step whose tensors are already on device
        (None on a pipeline stage before the last, which sends its rows on instead)."""
        n = input_ids.shape[0]
        bs = next(b for b in self.buckets if b >= n)
        bs = self.route.get(bs, bs)
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


def prefill_graph_tokens(tokens: int) -> int:
    """The largest prefill graph for a budget of `tokens`: a multiple of 16, 0 (none)
    under 16."""
    return tokens - tokens % 16 if tokens >= 16 else 0


def prefill_buckets(max_tokens: int) -> list[int]:
    """Token counts a prefill graph is captured for: powers of two to 256, then every 128
    (a prompt pads to the next: at most 1/3 more rows, ~2% for long prompts)."""
    return sorted({b for b in (16, 32, 64, 128, 256) if b < max_tokens} |
                  set(range(256, max_tokens, 128)) | {max_tokens})


class TokenBuckets:
    """Static token inputs of graphs captured per token-count bucket: a step's tokens are
    copied in and padded to the bucket (token 0 at position 0, K/V into the scratch
    block)."""

    def __init__(self, max_tokens: int, block_size: int, scratch_block: int,
                 device: torch.device) -> None:
        self.buckets = prefill_buckets(max_tokens)
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=device)

    def stage(self, input_ids: torch.Tensor, positions: torch.Tensor,
              meta: AttentionMetadata) -> int:
        """Copy a step's tokens in (device to device, no sync); returns its bucket."""
        n = input_ids.shape[0]
        tokens = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        if tokens > n:
            self.input_ids[n:tokens].zero_()
            self.positions[n:tokens].zero_()
            self.slot_mapping[n:tokens].fill_(self.scratch_slot)
        return tokens


class PrefillGraphs(TokenBuckets):
    """One prompt's prefill (a single-sequence step with no decode rows) as a graph replay,
    one graph per token-count bucket, giving the logits of the prompt's last token.

    The prompt's tokens are padded to the bucket: padded rows read token 0 at position 0,
    write their K/V into the scratch block and are masked out of attention (the sequence's
    query length stays the real one, on the device); only the last real row's logits are
    computed. Single-GPU engines for now (ModelRunner.capture_graphs)."""

    def __init__(self, model: torch.nn.Module, max_tokens: int, max_blocks_per_seq: int,
                 block_size: int, scratch_block: int, device: torch.device) -> None:
        super().__init__(max_tokens, block_size, scratch_block, device)
        self.model = model
        self.max_blocks = max_blocks_per_seq
        n = self.buckets[-1]
        i32 = dict(dtype=torch.int32, device=device)
        self.block_tables = torch.full((1, max_blocks_per_seq), scratch_block, **i32)
        self.seq_lens = torch.full((1,), n, **i32)
        self.query_start_loc = torch.tensor([0, n], **i32)
        self.last = torch.zeros(1, dtype=torch.int64, device=device)  # the last real row
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool: tuple | None = None

    def _forward(self, tokens: int) -> None:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:tokens], block_tables=self.block_tables,
            seq_lens=self.seq_lens, query_start_loc=self.query_start_loc,
            query_starts_host=[], seq_lens_host=[], max_query_len=tokens,
            max_seq_len=self.max_blocks * self.block_size)
        with forward_context(meta):
            hidden = self.model(self.input_ids[:tokens], self.positions[:tokens])
        self.logits[tokens] = self.model.compute_logits(hidden.index_select(0, self.last))

    @torch.inference_mode()
    def capture(self, pool: tuple | None = None) -> float:
        """Capture every bucket, largest first, into `pool` (shared with other graphs)."""
        started = time.perf_counter()
        for tokens in reversed(self.buckets):
            self.seq_lens.fill_(tokens)  # the warm-up attends over the scratch block only
            self.query_start_loc[1].fill_(tokens)
            self._forward(tokens)  # compile kernels, settle allocations
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(tokens)
            pool = graph.pool()
            self.graphs[tokens] = graph
        self.pool = pool
        torch.cuda.synchronize()
        return time.perf_counter() - started

    def can_run(self, scheduled: list, num_tokens: int, max_blocks: int) -> bool:
        """A step that prefills one prompt to its end (it samples) and nothing else."""
        if len(scheduled) != 1 or not scheduled[0].sample or scheduled[0].spec_token_ids \
                or scheduled[0].request.prompt_logprobs is not None:
            return False
        return num_tokens <= self.buckets[-1] and max_blocks <= self.max_blocks

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
            ) -> torch.Tensor:
        """Logits [1, vocab] of the prompt's last token; the step's tensors are on device."""
        tokens = self.stage(input_ids, positions, meta)
        width = meta.block_tables.shape[1]
        self.block_tables[:, :width].copy_(meta.block_tables, non_blocking=True)
        self.seq_lens.copy_(meta.seq_lens, non_blocking=True)
        self.query_start_loc.copy_(meta.query_start_loc, non_blocking=True)
        self.last.fill_(input_ids.shape[0] - 1)
        self.graphs[tokens].replay()
        return self.logits[tokens]
