"""The engine's side of speculative decoding: proposing drafts after each step and
rolling back what the verify step rejected."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kiln.runtime.request import PLACEHOLDER, Request, RequestStats
from kiln.runtime.speculative.config import SpeculativeConfig
from kiln.runtime.speculative.proposers import DraftModel, ngram_propose
from kiln.runtime.speculative.verify import VerifyGraphs

if TYPE_CHECKING:
    from kiln.runtime.engine import LLMEngine

log = logging.getLogger(__name__)

# Adaptive speculation: a request pauses after this many misses in a row (a verify step
# that kept no draft, or an n-gram lookup that found nothing), for PAUSE_MIN tokens, times
# PAUSE_GROWTH at each further miss, up to PAUSE_MAX (a probe with a draft model costs a
# catch-up forward and k draft steps: with x2 up to 64, a random 1B draft still cost 13% of
# an 8B target's decoding on the H200 (measured); x4 up to 256 probes 5 times in 128 tokens
# instead of 7, and about 9 times in 1,000 tokens (counted, not yet measured)).
MISSES_BEFORE_PAUSE = 2
PAUSE_MIN = 4
PAUSE_GROWTH = 4
PAUSE_MAX = 256


# ---- the engine's side -------------------------------------------------------------------
class Speculator:
    """Proposes drafts after each step and rolls back what the verify step rejected."""

    def __init__(self, engine: LLMEngine, config: SpeculativeConfig) -> None:
        self.engine = engine
        self.config = config
        self.draft = DraftModel(engine, config) if config.method == "draft_model" else None
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_verify_steps = 0

    def kv_bytes_per_block(self, block_size: int) -> int:
        """What the draft's cache adds to each block of the target's (0 for n-gram)."""
        return 0 if self.draft is None else int(self.draft.kv_bytes_per_token() * block_size)

    def start(self) -> None:
        """After the target's KV pool exists: the draft's pool, and the graphs."""
        engine = self.engine
        if self.draft is not None:
            self.draft.start()
        runner = engine.runner
        if engine.runtime.cuda_graphs and runner.device.type == "cuda":
            runner.verify_graphs = VerifyGraphs(runner, min(engine.max_batch_size, 64),
                                                self.config.num_speculative_tokens)
            seconds = runner.verify_graphs.capture()
            log.info("captured %d verify graphs (k=%d) in %.1f s",
                     len(runner.verify_graphs.buckets), self.config.num_speculative_tokens,
                     seconds)

    @staticmethod
    def eligible(request: Request) -> bool:
        """Penalties, bad words, a grammar and min_tokens change a row's logits with the
        tokens before it, which a draft row does not know yet: those requests decode
        plainly."""
        p = request.params
        return not (p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty or
                    request.bad_words_token_ids or request.grammar is not None or
                    request.num_output_tokens < p.min_tokens)

    def after_step(self, requests: list[Request], tokens: list[int]) -> None:
        """Roll back rejected drafts of the requests that sampled this step (one row per
        verified position, PLACEHOLDER past a rejection), then propose the next drafts of
        those still running."""
        kv = self.engine.kv
        kept: dict[str, int] = {}  # request id -> tokens the verify step emitted
        for r, token in zip(requests, tokens):
            kept[r.request_id] = kept.get(r.request_id, 0) + (token != PLACEHOLDER)
        seen: set[str] = set()
        going_on: list[Request] = []
        for r in requests:
            if r.request_id in seen:
                continue
            seen.add(r.request_id)
            k = len(r.spec_token_ids)
            if k:  # accepted drafts: all emitted tokens but the target's own last one
                accepted = kept[r.request_id] - 1
                self.num_verify_steps += 1
                self.num_draft_tokens += k
                self.num_accepted_tokens += accepted
                r.stats.num_spec_steps += 1
                r.stats.num_draft_tokens += k
                r.stats.num_accepted_tokens += accepted
                self._record(r, accepted > 0)
            r.spec_token_ids = []
            r.spec_draft_probs = None
            if r.status.finished:
                if self.draft is not None:
                    self.draft.release(r.request_id)
                continue
            if k:
                # Rejected positions' placeholders go; every kept token but the last is in
                # the KV cache now; trim the rest. (Only a verify step has such trailing
                # placeholders: a plain step's last one may be the next step's, in flight.)
                end = len(r.token_ids)
                while r.token_ids[end - 1] == PLACEHOLDER:
                    end -= 1
                del r.token_ids[end:]
                r.num_computed_tokens = r.num_tokens - 1
                kv.truncate(r, r.num_tokens)
                kv.commit(r)
            if self.will_propose(r):
                going_on.append(r)
        self._propose(going_on)
        if self.draft is not None:  # shadows of requests gone (aborted, preempted, done)
            running = {r.request_id for r in self.engine.scheduler.running}
            for request_id in list(self.draft.shadows):
                if request_id not in running:
                    self.draft.release(request_id)

    def _speculating(self, r: Request) -> bool:
        """r asks for drafts and adaptive speculation does not pause it."""
        return (r.params.num_speculative_tokens != 0 and self.eligible(r) and
                (not self.config.adaptive or r.num_output_tokens >= r.spec_resume_at))

    def will_propose(self, r: Request) -> bool:
        """Whether r proposes drafts now: speculating, and its last token on the host (not
        the placeholder of a next step in flight, with overlap)."""
        return r.token_ids[-1] != PLACEHOLDER and self._speculating(r)

    def wants_host_tokens(self) -> bool:
        """A running request has drafts or would propose some: the engine applies the step
        in flight before it schedules the next (no overlap for that step)."""
        return any(r.spec_token_ids or self._speculating(r)
                   for r in self.engine.scheduler.running)

    def _record(self, r: Request, gained: bool) -> None:
        """Adaptive speculation: count a miss (pausing the request after a few in a row,
        for longer each time) or reset the count after a step that kept a draft."""
        if not self.config.adaptive:
            return
        if not gained:
            r.spec_misses += 1
            if r.spec_misses >= MISSES_BEFORE_PAUSE:
                pause = min(PAUSE_MIN * PAUSE_GROWTH ** (r.spec_misses - MISSES_BEFORE_PAUSE),
                            PAUSE_MAX)
                r.spec_resume_at = r.num_output_tokens + pause
        else:
            r.spec_misses = 0

    def _propose(self, requests: list[Request]) -> None:
        wanted, ks = [], []
        for r in requests:
            # The step emits up to k + 1 tokens: never past max_tokens. A request may ask
            # for fewer drafts than the engine's k (0: none).
            own = r.params.num_speculative_tokens
            k = min(self.config.num_speculative_tokens if own is None else own,
                    r.max_tokens - r.num_output_tokens - 1)
            if k >= 1 and self.eligible(r) and r.num_tokens - r.num_computed_tokens == 1:
                wanted.append(r)
                ks.append(k)
        if self.draft is not None:
            if wanted:
                self.draft.propose(wanted, ks)
            return
        c = self.config
        for r, k in zip(wanted, ks):
            r.spec_token_ids = ngram_propose(r.token_ids, k, c.prompt_lookup_min,
                                             c.prompt_lookup_max)
            if not r.spec_token_ids:
                self._record(r, False)  # nothing to copy here: look again later

    def reset_stats(self) -> None:
        self.num_draft_tokens = self.num_accepted_tokens = self.num_verify_steps = 0
        if self.draft is not None:
            self.draft.reset_costs()

    def stats(self) -> dict[str, float]:
        drafted = self.num_draft_tokens
        return {
            "spec_num_draft_tokens": drafted,
            "spec_num_accepted_tokens": self.num_accepted_tokens,
            "spec_acceptance_rate": self.num_accepted_tokens / drafted if drafted else 0.0,
            "spec_mean_accepted_length": (
                1 + self.num_accepted_tokens / self.num_verify_steps
                if self.num_verify_steps else 0.0),
        }


def request_spec_stats(s: RequestStats) -> dict[str, float]:
    """Acceptance rate and mean tokens per verify step of one request (its stats)."""
    return {
        "acceptance_rate": s.num_accepted_tokens / s.num_draft_tokens
        if s.num_draft_tokens else 0.0,
        "mean_accepted_length": 1 + s.num_accepted_tokens / s.num_spec_steps
        if s.num_spec_steps else 0.0,
    }
