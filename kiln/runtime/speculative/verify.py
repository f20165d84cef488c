"""The verify step: accepted drafts and the target's token from k + 1 rows of logits
(greedy identity, rejection sampling), and the verify step as CUDA graphs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kiln.kernels import reference as ref
from kiln.runtime.request import PLACEHOLDER, Request
from kiln.runtime.speculative.config import DRAFT_SEED_SALT
from kiln.runtime.speculative.proposers import filtered_probs
from kiln.runtime.step import PendingStep
from kiln.runtime.transfer import to_device

if TYPE_CHECKING:
    from kiln.runtime.scheduler import ScheduledRequest


# ---- the verify step -------------------------------------------------------------------
def verify(logits: torch.Tensor, entries: list[ScheduledRequest], vocab_size: int,
           device: torch.device,
           prompt_logprobs: dict[str, tuple[int, list[dict[int, float]]]]) -> PendingStep:
    """Tokens of a step whose sampling entries may carry drafts: logits has k + 1 rows for
    an entry with k drafts (its last token's and each draft's), one for the others.

    The result has one row per logits row, the request repeated; a row past an entry's
    first rejection holds PLACEHOLDER. Nothing here waits for the device.
    """
    from kiln.runtime.sampler import SamplingBatch, sample

    rows: list[Request] = []
    offsets: list[int] = []  # output position of the row's token, past the request's
    drafts: list[int] = []  # the draft this row checks; -1 on an entry's last row
    entry_start: list[int] = []  # first row of the row's entry
    for e in entries:
        k = len(e.spec_token_ids)
        first = len(rows)
        rows += [e.request] * (k + 1)
        offsets += range(k + 1)
        drafts += list(e.spec_token_ids) + [-1]
        entry_start += [first] * (k + 1)
    batch = SamplingBatch.from_requests(rows, vocab_size, device)
    offset_t = to_device(offsets, torch.int64, device)
    batch.steps = batch.steps + offset_t
    logits = logits.float()
    # The target's own pick at each row: the correction or bonus token; for greedy rows
    # also the test of the draft.
    target, _, _ = sample(logits, batch)
    draft_t = to_device(drafts, torch.int64, device)
    has_draft = draft_t >= 0
    safe_draft = draft_t.clamp_min(0)
    accepted = has_draft & (target == draft_t)
    tokens = target
    sampled_rows = [i for i, (r, d) in enumerate(zip(rows, drafts)) if d >= 0 and
                    not r.params.greedy]
    if sampled_rows:
        index = to_device(sampled_rows, torch.int64, device)
        sub_logits = logits[index]
        if batch.bias is not None:
            sub_logits = sub_logits + batch.bias[index]
        if batch.banned is not None:
            sub_logits = sub_logits.masked_fill(batch.banned[index], float("-inf"))
        sub_rows = [rows[i] for i in sampled_rows]
        p = filtered_probs(sub_logits, sub_rows, device)
        q = torch.zeros_like(p)
        d = safe_draft[index]
        for n, i in enumerate(sampled_rows):
            probs = rows[i].spec_draft_probs
            if probs is not None:
                q[n] = probs[offsets[i]].to(q.dtype)
            else:  # a deterministic proposal: q is one-hot on the draft
                q[n, drafts[i]] = 1.0
        seeds, steps = batch.seeds[index], batch.steps[index]
        # One more column of the counter-based noise: independent of the token draws.
        u = ref.uniform_noise(seeds, steps, vocab_size + 1)[:, vocab_size]
        p_d, q_d = p.gather(1, d[:, None])[:, 0], q.gather(1, d[:, None])[:, 0]
        keep = u * q_d < p_d
        residual = (p - q).clamp_min(0)
        noise = ref.uniform_noise(seeds ^ DRAFT_SEED_SALT * 3, steps, vocab_size)
        resampled = (residual / -torch.log(noise)).argmax(dim=-1)
        accepted = accepted.clone()
        accepted[index] = keep
        tokens = tokens.clone()
        tokens[index] = torch.where(keep, d, resampled)
    tokens = torch.where(accepted, draft_t, tokens)
    # A row counts if every earlier row of its entry accepted its draft.
    rejected = (has_draft & ~accepted).long()
    before = torch.cumsum(rejected, 0) - rejected  # rejections on earlier rows, all entries
    starts = to_device(entry_start, torch.int64, device)
    valid = (before - before[starts]) == 0
    tokens = torch.where(valid, tokens, torch.full_like(tokens, PLACEHOLDER))
    lp = lp_ids = None
    if batch.wants_logprobs:
        logprobs = torch.log_softmax(logits, dim=-1)
        top_lp, top_ids = logprobs.topk(batch.max_logprobs, dim=-1)
        chosen = tokens.clamp_min(0)
        lp = torch.cat([logprobs.gather(1, chosen[:, None]), top_lp], 1)
        lp_ids = torch.cat([chosen[:, None], top_ids], 1)
    indices = [r.num_tokens + o for r, o in zip(rows, offsets)]
    return PendingStep(rows, indices, tokens, lp, lp_ids, prompt_logprobs)


# ---- the verify step as CUDA graphs -------------------------------------------------------
class VerifyGraphs:
    """Verify steps as graph replays, one graph per batch bucket of sequences with up to
    k + 1 query tokens each (the last token and the drafts).

    The varlen prefill attention kernel's launch depends only on shapes and on
    max_query_len (fixed at k + 1 here), not on the query lengths, which it reads from
    query_start_loc on the device: so real tokens are packed as in an eager step and
    the static token buffer is filled up with filler tokens. The padded sequences of the
    bucket own one filler token each and attend to the scratch block; other filler tokens
    belong to no sequence. Filler K/V go to the scratch block, their logits are dropped,
    and nothing real ever reads them. On the CPU (`capture=False`) the same layout runs
    eagerly, for tests.
    """

    def __init__(self, runner: Any, max_batch_size: int, num_speculative_tokens: int,
                 capture: bool = True) -> None:
        from kiln.runtime.cuda_graphs import batch_buckets

        self.runner = runner
        self.width = num_speculative_tokens + 1
        self.buckets = batch_buckets(max_batch_size)
        self.block_size = runner.block_size
        self.max_seq_len = runner.engine.build.max_seq_len
        self.max_blocks = -(-self.max_seq_len // self.block_size)
        self.scratch_block = runner.num_blocks
        self.capture_graphs = capture
        n, w, device = self.buckets[-1], self.width, runner.device
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n * w, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n * w, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n * w,), self.scratch_block * self.block_size,
                                       dtype=torch.int64, device=device)
        self.block_tables = torch.full((n, self.max_blocks), self.scratch_block, **i32)
        self.seq_lens = torch.full((n,), w, **i32)
        self.query_start_loc = torch.arange(n + 1, **i32) * w
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # every bucket's logits: views of one buffer (as DecodeGraphs keeps them)
        self.logits: dict[int, torch.Tensor] = {}
        self.logits_buffer: torch.Tensor | None = None

    def _forward(self, bs: int, query_starts: list[int] | None = None,
                 seq_lens: list[int] | None = None, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
        from kiln.layers import AttentionMetadata, forward_context

        model, tokens = self.runner.model, bs * self.width
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:tokens], block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs], query_start_loc=self.query_start_loc[:bs + 1],
            query_starts_host=query_starts or [], seq_lens_host=seq_lens or [],
            max_query_len=self.width, max_seq_len=self.max_blocks * self.block_size)
        with forward_context(meta):
            hidden = model(self.input_ids[:tokens], self.positions[:tokens])
            return model.compute_logits(hidden, out=out)

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket, largest first so smaller ones reuse its memory pool."""
        import time

        started = time.perf_counter()
        pool = None
        for bs in reversed(self.buckets):
            for _ in range(2):  # warm up: compile kernels, settle allocations
                logits = self._forward(bs)
            if self.logits_buffer is None:  # the largest bucket, outside the graphs' pool
                self.logits_buffer = logits.new_empty(bs * self.width, logits.shape[1])
            del logits
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._forward(
                    bs, out=self.logits_buffer[:bs * self.width])
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        return time.perf_counter() - started

    def can_run(self, entries: list[ScheduledRequest]) -> bool:
        """Every entry a decode step (one known token, drafts or not) that fits the
        bucket, the width and the block table."""
        if len(entries) > self.buckets[-1]:
            return False
        for e in entries:
            r, k = e.request, len(e.spec_token_ids)
            if not e.sample or e.num_new_tokens - k != 1 or k >= self.width or \
                    r.prompt_logprobs is not None or len(r.block_ids) > self.max_blocks:
                return False
        return True

    @torch.inference_mode()
    def run(self, entries: list[ScheduledRequest]) -> torch.Tensor:
        """Logits of the verify rows (k + 1 per entry, in order), as the eager step's."""
        n, w, block = len(entries), self.width, self.block_size
        bs = next(b for b in self.buckets if b >= n)
        scratch_slot = self.scratch_block * block
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_starts = [0]
        seq_lens: list[int] = []
        width = max(len(e.request.block_ids) for e in entries)
        table = []
        for e in entries:
            r = e.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + e.num_new_tokens
            ids += [r.token_ids[start]] + e.spec_token_ids
            positions += range(start, end)
            slots += [r.block_ids[p // block] * block + p % block for p in range(start, end)]
            query_starts.append(query_starts[-1] + end - start)
            seq_lens.append(end)
            table.append(r.block_ids + [self.scratch_block] * (width - len(r.block_ids)))
        rows = list(range(query_starts[-1]))  # the real tokens come first
        for _ in range(n, bs):  # padded sequences: one filler token on the scratch block
            query_starts.append(query_starts[-1] + 1)
            seq_lens.append(1)
            table.append([self.scratch_block] * width)
        filler = bs * w - len(ids)
        ids += [0] * filler
        positions += [0] * filler
        slots += [scratch_slot] * filler
        device = self.runner.device
        tokens = bs * w
        for buffer, values in ((self.input_ids[:tokens], ids),
                               (self.positions[:tokens], positions),
                               (self.slot_mapping[:tokens], slots),
                               (self.block_tables[:bs, :width], table),
                               (self.seq_lens[:bs], seq_lens),
                               (self.query_start_loc[:bs + 1], query_starts)):
            buffer.copy_(to_device(values, buffer.dtype, device), non_blocking=True)
        if self.capture_graphs:
            self.graphs[bs].replay()
            logits = self.logits[bs]
        else:
            logits = self._forward(bs, query_starts, seq_lens)
        return logits[:len(rows)]
