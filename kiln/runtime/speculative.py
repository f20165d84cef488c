"""Speculative decoding: proposers, the verify step's sampler, and KV rollback.

A request that speculates carries `spec_token_ids`, k draft tokens proposed after its last
step. The scheduler gives it 1 + k query tokens (its last token and the drafts); the model
runner computes the target's logits at all k + 1 positions in one forward through the
ordinary paged attention path, and `verify` turns them into the tokens the request keeps:
the drafts up to the first rejection, then one token of the target's (a correction, or a
bonus when every draft was accepted). Rows past the first rejection come back as
PLACEHOLDER and are dropped.

Exactness. Greedy rows accept a draft iff it is the target's argmax, so the output is the
one of plain decoding. Sampled rows use rejection sampling (Leviathan et al. 2023, Chen et
al. 2023): draft d drawn from q is kept with probability min(1, p(d) / q(d)); otherwise the
token is drawn from max(0, p - q) renormalised; that makes every emitted token follow p.
An n-gram proposal is a q that is one-hot on d. All draws use counter-based noise of
(request seed, output position), so seeded requests are reproducible.

Rollback. Drafts never enter `request.token_ids` until accepted, and the scheduler counts
only the real token as computed: rejected drafts' K/V stay in the cache as garbage past
the request's length and are overwritten by its next step. `finish_step` trims the block
table to the tokens kept; nothing is copied.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.kernels import reference as ref
from kiln.runtime.request import PLACEHOLDER, Request, RequestStats
from kiln.runtime.transfer import to_device

if TYPE_CHECKING:
    from kiln.runtime.engine import LLMEngine
    from kiln.runtime.model_runner import PendingStep
    from kiln.runtime.scheduler import ScheduledRequest

log = logging.getLogger(__name__)

METHODS = ("ngram", "draft_model")
# Draft-model draws use the request's seed xor this, so they are independent of the
# target's draws at the same positions.
_DRAFT_SEED_SALT = 0x5DEECE66D


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config` keys."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1  # ngram: shortest suffix n-gram looked up
    prompt_lookup_max: int = 4  # ngram: longest, tried first
    model: str | None = None  # draft_model: engine dir, HF folder or GGUF

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None
              ) -> SpeculativeConfig | None:
        """From a dict, a JSON string (the CLI flag) or None; KilnError on a bad value."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise KilnError(f"--speculative-config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise KilnError("speculative_config must be a JSON object, e.g. "
                            '{"method": "ngram", "num_speculative_tokens": 4}')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise KilnError(f"unknown speculative_config keys {unknown}; known: {sorted(known)}")
        method = value.get("method")
        if method is None and value.get("model"):
            method = "draft_model"
        if method not in METHODS:
            raise KilnError(f"speculative_config method must be one of {METHODS}, "
                            f"got {method!r}")
        k = value.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 32:
            raise KilnError("speculative_config needs num_speculative_tokens, an integer in "
                            f"[1, 32], got {k!r}")
        config = cls(**{**value, "method": method})
        lo, hi = config.prompt_lookup_min, config.prompt_lookup_max
        if method == "ngram" and not (isinstance(lo, int) and isinstance(hi, int) and
                                      1 <= lo <= hi):
            raise KilnError("speculative_config needs 1 <= prompt_lookup_min <= "
                            f"prompt_lookup_max, got {lo!r} and {hi!r}")
        if method == "draft_model" and not config.model:
            raise KilnError('speculative_config method "draft_model" needs "model": an '
                            "engine dir, HF folder or GGUF file of the draft")
        return config


# ---- proposers --------------------------------------------------------------------------
def ngram_propose(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens
    (longest n first) and propose the k tokens that followed it; [] if none matches.

    One vectorised pass finds where the last token occurred before; each of those is
    then extended backwards, up to max_n tokens, against the suffix."""
    length = len(token_ids)
    max_n = min(max_n, length - 1)
    if max_n < min_n:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    ends = np.flatnonzero(tokens[:length - 1] == tokens[length - 1])  # candidate matches
    if ends.size == 0:
        return []
    matched = np.ones(ends.size, dtype=np.int64)
    alive = np.ones(ends.size, dtype=bool)
    for back in range(1, max_n):
        before = ends - back
        alive &= before >= 0
        alive[alive] = tokens[before[alive]] == tokens[length - 1 - back]
        if not alive.any():
            break
        matched += alive
    best = int(matched.max())
    if best < min_n:
        return []
    start = int(ends[matched == best][-1]) + 1
    return token_ids[start:start + k]


class DraftModel:
    """A smaller model of the same vocabulary proposing k tokens autoregressively.

    It has its own model runner and KV pool managed by the same KVCacheManager; each target
    request has a shadow Request here whose token_ids follow the target's. After a step,
    the shadow's computed length falls back to the prefix it shares with the target (the
    rollback of rejected drafts), then the draft runs one catch-up forward and k - 1
    single-token forwards for every speculating request together.
    """

    def __init__(self, engine: LLMEngine, config: SpeculativeConfig) -> None:
        from kiln.build.engine_dir import load_engine_config
        from kiln.config import BuildConfig
        from kiln.resolve import resolve_engine
        from kiln.runtime.model_runner import ModelRunner
        from kiln.tokenizer import Tokenizer

        target = engine.config
        build = BuildConfig(dtype=target.build.dtype, max_seq_len=engine.max_seq_len,
                            max_batch_size=engine.max_batch_size)
        self.engine_dir = resolve_engine(config.model, build)  # KilnError if unreadable
        draft = load_engine_config(self.engine_dir)
        if draft.model.vocab_size != target.model.vocab_size:
            raise KilnError(f"the draft model's vocabulary ({draft.model.vocab_size} tokens) "
                            f"differs from the target's ({target.model.vocab_size})")
        draft_tok = Tokenizer.from_engine(self.engine_dir)
        if engine.tokenizer is not None and draft_tok is not None and \
                engine.tokenizer.tok.get_vocab() != draft_tok.tok.get_vocab():
            raise KilnError("the draft model's tokenizer differs from the target's: "
                            "speculative decoding needs the same vocabulary")
        if draft.build.max_seq_len < engine.max_seq_len:
            raise KilnError(f"the draft engine {self.engine_dir} was built for max_seq_len "
                            f"{draft.build.max_seq_len}, below the target's "
                            f"{engine.max_seq_len}")
        self.runner = ModelRunner(self.engine_dir, draft, engine.device)
        self.vocab_size = draft.model.vocab_size
        self.engine = engine
        self.shadows: dict[str, Request] = {}

    def kv_bytes_per_token(self) -> float:
        return self.runner.kv_bytes_per_block() / self.runner.block_size

    def start(self) -> None:
        """Allocate the draft's KV pool once the target's is sized: as many tokens."""
        from kiln.runtime.kv_cache import KVCacheManager

        engine = self.engine
        num_tokens = engine.kv.num_blocks * engine.kv.block_size
        num_blocks = -(-num_tokens // self.runner.block_size)
        self.runner.allocate_kv_cache(num_blocks)
        self.kv = KVCacheManager(num_blocks, self.runner.block_size, False)
        if engine.runtime.cuda_graphs:  # the k - 1 single-token steps replay decode graphs
            self.runner.capture_graphs(min(engine.max_batch_size, 64))

    def release(self, request_id: str) -> None:
        shadow = self.shadows.pop(request_id, None)
        if shadow is not None:
            self.kv.free(shadow)

    @torch.inference_mode()
    def propose(self, requests: list[Request], ks: list[int]) -> None:
        """Set spec_token_ids (and spec_draft_probs for sampled requests) of each request."""
        from kiln.runtime.scheduler import ScheduledRequest, SchedulerOutput

        active, budgets = [], []
        for r, k in zip(requests, ks):
            shadow = self.shadows.get(r.request_id)
            if shadow is None:
                shadow = self.shadows[r.request_id] = Request(r.request_id, r.token_ids,
                                                              r.params, r.max_tokens)
            else:
                common = 0
                for a, b in zip(shadow.token_ids, r.token_ids):
                    if a != b:
                        break
                    common += 1
                shadow.token_ids = list(r.token_ids)
                shadow.num_computed_tokens = min(shadow.num_computed_tokens, common,
                                                 len(r.token_ids) - 1)
            # Room for the catch-up and k - 1 drafts; without it this request sits out.
            if self.kv.allocate(shadow, r.num_tokens + k - 1):
                active.append((r, shadow))
                budgets.append(k)
        if not active:
            return
        drafts: list[list[int]] = [[] for _ in active]
        probs: list[list[torch.Tensor]] = [[] for _ in active]
        for i in range(max(budgets)):
            rows = [j for j, k in enumerate(budgets) if k > i]
            entries = []
            for j in rows:
                shadow = active[j][1]
                entries.append(ScheduledRequest(
                    shadow, shadow.num_tokens - shadow.num_computed_tokens, True))
            out = SchedulerOutput(entries)
            ids, positions, meta, logits_indices = self.runner.prepare(out)
            graphs = self.runner.graphs
            if meta.max_query_len == 1 and graphs is not None and \
                    graphs.can_run(len(entries), meta.block_tables.shape[1]):
                logits = graphs.run(ids, positions, meta).float()
            else:
                hidden = self.runner._forward(ids, positions, meta)
                logits = self.runner.model.compute_logits(hidden[logits_indices]).float()
            requests_i = [active[j][0] for j in rows]
            tokens, q = _draft_sample(logits, requests_i, [len(drafts[j]) for j in rows])
            for e in entries:
                e.request.num_computed_tokens += e.num_new_tokens
            for row, (j, token) in enumerate(zip(rows, tokens.tolist())):
                drafts[j].append(token)
                active[j][1].token_ids.append(token)
                if q is not None:
                    probs[j].append(q[row])
        for j, (r, _) in enumerate(active):
            r.spec_token_ids = drafts[j]
            r.spec_draft_probs = torch.stack(probs[j]) if probs[j] and \
                not r.params.greedy else None


def _draft_sample(logits: torch.Tensor, requests: list[Request], offsets: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The draft's tokens [B] and, when any request samples, its distributions q [B, V]
    (exactly what the tokens were drawn from: the request's temperature and filters)."""
    greedy = logits.argmax(dim=-1)
    if all(r.params.greedy for r in requests):
        return greedy, None
    device = logits.device
    probs = _filtered_probs(logits, requests, device)
    seeds = to_device([r.sampling_seed ^ _DRAFT_SEED_SALT for r in requests], torch.int64,
                      device)
    steps = to_device([r.num_output_tokens + o for r, o in zip(requests, offsets)],
                      torch.int64, device)
    race = probs / -torch.log(ref.uniform_noise(seeds, steps, logits.shape[-1]))
    is_greedy = to_device([r.params.greedy for r in requests], torch.bool, device)
    return torch.where(is_greedy, greedy, race.argmax(dim=-1)), probs


def _filtered_probs(logits: torch.Tensor, requests: list[Request],
                    device: torch.device) -> torch.Tensor:
    """softmax(logits / T) after min-p, top-k and top-p, renormalised, per row's request."""
    ps = [r.params for r in requests]
    vocab = logits.shape[-1]
    t = to_device([max(p.temperature, 1e-5) for p in ps], torch.float32, device)[:, None]
    top_k = to_device([p.top_k if 0 < p.top_k < vocab else 0 for p in ps], torch.int64, device)
    top_p = to_device([p.top_p for p in ps], torch.float32, device)
    min_p = to_device([p.min_p for p in ps], torch.float32, device)
    probs = ref.filter_probs(torch.softmax(logits.float() / t, dim=-1), top_k, top_p, min_p)
    return probs / probs.sum(dim=-1, keepdim=True)


# ---- the verify step -------------------------------------------------------------------
def verify(logits: torch.Tensor, entries: list[ScheduledRequest], vocab_size: int,
           device: torch.device,
           prompt_logprobs: dict[str, tuple[int, list[dict[int, float]]]]) -> PendingStep:
    """Tokens of a step whose sampling entries may carry drafts: logits has k + 1 rows for
    an entry with k drafts (its last token's and each draft's), one for the others.

    The result has one row per logits row, the request repeated; a row past an entry's
    first rejection holds PLACEHOLDER. Nothing here waits for the device.
    """
    from kiln.runtime.model_runner import PendingStep
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
        p = _filtered_probs(sub_logits, sub_rows, device)
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
        noise = ref.uniform_noise(seeds ^ _DRAFT_SEED_SALT * 3, steps, vocab_size)
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
            r.spec_token_ids = []
            r.spec_draft_probs = None
            if r.status.finished:
                if self.draft is not None:
                    self.draft.release(r.request_id)
                continue
            end = len(r.token_ids)
            while r.token_ids[end - 1] == PLACEHOLDER:
                end -= 1
            del r.token_ids[end:]
            if k:
                # Every kept token but the last is in the KV cache now; trim the rest.
                r.num_computed_tokens = r.num_tokens - 1
                kv.truncate(r, r.num_tokens)
                kv.commit(r)
            going_on.append(r)
        self._propose(going_on)
        if self.draft is not None:  # shadows of requests gone (aborted, preempted, done)
            running = {r.request_id for r in self.engine.scheduler.running}
            for request_id in list(self.draft.shadows):
                if request_id not in running:
                    self.draft.release(request_id)

    def _propose(self, requests: list[Request]) -> None:
        wanted, ks = [], []
        for r in requests:
            # The step emits up to k + 1 tokens: never past max_tokens.
            k = min(self.config.num_speculative_tokens,
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

    def reset_stats(self) -> None:
        self.num_draft_tokens = self.num_accepted_tokens = self.num_verify_steps = 0

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
        self.logits: dict[int, torch.Tensor] = {}

    def _forward(self, bs: int, query_starts: list[int] | None = None,
                 seq_lens: list[int] | None = None) -> torch.Tensor:
        from kiln.layers import AttentionMetadata, forward_context

        model, tokens = self.runner.model, bs * self.width
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:tokens], block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs], query_start_loc=self.query_start_loc[:bs + 1],
            query_starts_host=query_starts or [], seq_lens_host=seq_lens or [],
            max_query_len=self.width, max_seq_len=self.max_blocks * self.block_size)
        with forward_context(meta):
            hidden = model(self.input_ids[:tokens], self.positions[:tokens])
            return model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket, largest first so smaller ones reuse its memory pool."""
        import time

        started = time.perf_counter()
        pool = None
        for bs in reversed(self.buckets):
            for _ in range(2):  # warm up: compile kernels, settle allocations
                self._forward(bs)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._forward(bs)
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
