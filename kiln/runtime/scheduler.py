"""Continuous-batching scheduler: pure Python, no torch.

There is no prefill or decode phase. Each request has `num_computed_tokens`; every step
the scheduler hands out a token budget (`max_num_tokens`) across requests, running ones
first, then waiting ones in arrival order. A prompt larger than what is left of the
budget is computed in chunks over several steps (chunked prefill) while the others keep
decoding. A request samples a token only in the step that computes its last known token.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Set
from dataclasses import dataclass, field

from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.request import Request, RequestStatus

POLICIES = ("max_utilization", "guaranteed_no_evict")


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, from request.num_computed_tokens on
    sample: bool  # whether this step ends at the request's last known token
    # Draft tokens verified this step (speculative decoding): the last of num_new_tokens,
    # not in request.token_ids, and not counted as computed until accepted.
    spec_token_ids: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)

    def launch_shape(self) -> tuple[int, int]:
        """(decode rows, with their drafts if any; prompt tokens, first time or
        recomputed), before the scheduler's update advances the computed counts."""
        decodes = [e for e in self.scheduled
                   if e.request.num_computed_tokens == e.request.num_tokens - 1]
        return len(decodes), self.num_tokens - sum(e.num_new_tokens for e in decodes)

    @property
    def needs_host_tokens(self) -> bool:
        """Penalties, bad words and grammars read the generated tokens' values on the host,
        so this step cannot be launched before the previous one's tokens arrive."""
        for entry in self.scheduled:
            p = entry.request.params
            if p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty or \
                    entry.request.bad_words_token_ids or entry.request.grammar is not None:
                return True
        return False


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_batch_size: int, max_num_tokens: int,
                 policy: str = "max_utilization", chunked_prefill: bool = True) -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduler policy must be one of {POLICIES}, got {policy!r}")
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.policy = policy
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # LongRoPE (Phi-3): a sequence longer than this is computed with the long factors
        # on every token, as transformers does (it recomputes the cache on crossing).
        self.long_rope_after: int | None = None

    # ---- queue ----------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request (stopped, length, aborted): its blocks are released at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------
    def schedule(self, busy: Set[str] = frozenset(), max_seqs: int | None = None
                 ) -> SchedulerOutput:
        """The next step's requests. busy: ids of requests inside a pipeline micro-batch
        still in flight (neither scheduled nor preempted now); max_seqs: at most that many
        sequences in this step (a micro-batch's share of the running ones)."""
        out = SchedulerOutput()
        budget = self.max_num_tokens
        seqs = max_seqs if max_seqs is not None else self.max_batch_size
        # Running requests first, oldest first; the newest may be preempted for them.
        # (This loop runs for every running request every step: what it reads is hoisted.)
        i = 0
        running, scheduled, allocate = self.running, out.scheduled, self.kv.allocate
        long_rope = self.long_rope_after is not None
        while i < len(running) and budget > 0 and len(scheduled) < seqs:
            request = running[i]
            num_tokens = len(request.token_ids)
            if num_tokens - request.num_prompt_tokens >= request.max_tokens or \
                    request.request_id in busy:
                i += 1  # its last token is still in flight; it will finish, not continue
                continue
            if long_rope:
                self.check_long_rope(request)
            left = num_tokens - request.num_computed_tokens
            num_new = min(left, self._chunk_budget(budget))
            spec = request.spec_token_ids[:budget - 1] if left == 1 and \
                request.spec_token_ids else None
            if spec and long_rope and not request.rope_long:
                # LongRoPE: positions from long_rope_after on take the long factors, after
                # a recompute; a draft there would be checked with the short ones.
                spec = spec[:max(self.long_rope_after - num_tokens, 0)]
            if spec and allocate(request, request.num_tokens + len(spec)):
                request.spec_token_ids = spec  # the drafts verified (and counted) this step
                out.scheduled.append(ScheduledRequest(request, 1 + len(spec), True, spec))
                budget -= 1 + len(spec)
                i += 1
                continue
            if request.spec_token_ids:
                _drop_drafts(request)  # it decodes plainly this step: none are verified
            while not allocate(request, request.num_computed_tokens + num_new):
                victim = next((r for r in reversed(self.running)
                               if r.request_id not in busy), request)
                self._preempt(victim, out)
                scheduled = out.scheduled  # (_preempt made a new list)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, num_new,
                                                  request.num_computed_tokens + num_new ==
                                                  len(request.token_ids)))
                budget -= num_new
                i += 1
                continue
            # The request preempted itself: nothing further down the list remains.
            break
        # Then waiting requests in arrival order, while budget, batch slots and blocks last.
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size and \
                len(out.scheduled) < seqs:
            request = self.waiting[0]
            if out.preempted and request in out.preempted:
                break  # don't re-admit what was preempted in this very step
            self.check_long_rope(request)
            looked_up = not request.block_ids
            reuse = self.kv.match_prefix(request) if looked_up else []
            num_cached = len(reuse) * self.kv.block_size
            remaining = request.num_tokens - num_cached
            if remaining > budget and not self.chunked_prefill:
                break
            num_new = min(remaining, self._chunk_budget(budget))
            if not self._admissible(request, num_cached + num_new, reuse):
                break
            if not self.kv.allocate(request, num_cached + num_new, reuse):
                break
            self.waiting.popleft()
            if looked_up:
                self.kv.count_lookup(request, num_cached)
            request.num_computed_tokens = num_cached
            request.stats.num_cached_tokens = max(request.stats.num_cached_tokens, num_cached)
            request.status = RequestStatus.RUNNING
            if request.stats.first_scheduled_time is None:
                request.stats.first_scheduled_time = time.monotonic()
            self.running.append(request)
            out.scheduled.append(self._entry(request, num_new))
            budget -= num_new
        return out

    def check_long_rope(self, request: Request) -> None:
        """The step that takes a sequence past the original context recomputes it from
        its first token with the long factors (its blocks are freed, as in preemption)."""
        if self.long_rope_after is None or request.rope_long or \
                request.num_tokens <= self.long_rope_after:
            return
        request.rope_long = True
        request.block_hashes.clear()
        if request.block_ids:
            self.kv.free(request)
        request.num_computed_tokens = 0
        _drop_drafts(request)

    def _chunk_budget(self, budget: int) -> int:
        """Tokens a request may compute this step: the step's budget, and with attention
        sinks what its window can take in at once."""
        cap = self.kv.max_chunk
        return budget if cap is None else min(budget, cap)

    def _entry(self, request: Request, num_new: int) -> ScheduledRequest:
        sample = request.num_computed_tokens + num_new == request.num_tokens
        return ScheduledRequest(request, num_new, sample)

    def _admissible(self, request: Request, num_tokens: int, reuse: list[int]) -> bool:
        if self.policy == "max_utilization":
            return True
        # guaranteed_no_evict: admit only if this request and every running one can grow
        # to their maximum length without anyone being preempted.
        def blocks_to_end(r: Request, held: int) -> int:
            return max(self.kv.max_blocks(r.num_prompt_tokens + r.max_tokens) - held, 0)

        reserved = sum(blocks_to_end(r, len(r.block_ids)) for r in self.running)
        return blocks_to_end(request, len(reuse)) + reserved <= self.kv.num_free_blocks - sum(
            1 for b in reuse if self.kv.ref_counts[b] == 0)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Free the request's blocks and requeue it first; it will be recomputed."""
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        _drop_drafts(request)
        request.status = RequestStatus.WAITING
        request.stats.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)
        out.scheduled = [s for s in out.scheduled if s.request is not request]

    def update(self, out: SchedulerOutput) -> None:
        """After the model ran: advance computed counts and publish full blocks for reuse."""
        for entry in out.scheduled:
            entry.request.num_computed_tokens += entry.num_new_tokens - len(entry.spec_token_ids)
            self.kv.commit(entry.request)


def _drop_drafts(request: Request) -> None:
    """A request recomputed from scratch verifies no drafts: the ones proposed after its
    last step would otherwise be counted (and rolled back) after its next prefill."""
    request.spec_token_ids = []
    request.spec_draft_probs = None
