"""Draft proposers: n-gram prompt lookup and a draft model with its own KV cache."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.kernels import reference as ref
from kiln.runtime.request import Request
from kiln.runtime.speculative.config import DRAFT_SEED_SALT, SpeculativeConfig
from kiln.runtime.transfer import to_device

if TYPE_CHECKING:
    from kiln.runtime.engine import LLMEngine

log = logging.getLogger(__name__)


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
        if draft_tok is None:  # accepted, as vLLM accepts a draft model: sizes compared
            log.warning("the draft model %s has no tokenizer files: only its vocabulary "
                        "size (%d tokens, as the target's) was checked; its token ids are "
                        "read as the target's", self.engine_dir, draft.model.vocab_size)
        if draft.build.max_seq_len < engine.max_seq_len:
            raise KilnError(f"the draft engine {self.engine_dir} was built for max_seq_len "
                            f"{draft.build.max_seq_len}, below the target's "
                            f"{engine.max_seq_len}")
        self.runner = ModelRunner(self.engine_dir, draft, engine.device)
        self.vocab_size = draft.model.vocab_size
        self.engine = engine
        self.shadows: dict[str, Request] = {}
        self.reset_costs()

    def reset_costs(self) -> None:
        """What the draft costs (benchmarks/speculative.py reads them): forwards replayed
        from a decode graph or run eagerly, and the host's seconds in propose()."""
        self.num_graph_forwards = self.num_eager_forwards = 0
        self.propose_seconds = 0.0

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
        # Its catch-up forwards (a whole prompt the first time, then 1 .. k + 1 tokens) are
        # eager: their kernels compiled now, not inside a step (GPU only, as the target's;
        # a prompt longer than the target's step budget takes the same launches)
        self.runner.warmup(engine.max_num_tokens, engine.max_seq_len)
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

        started = time.perf_counter()
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
                self.num_graph_forwards += 1
            else:
                self.num_eager_forwards += 1
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
        self.propose_seconds += time.perf_counter() - started


def _draft_sample(logits: torch.Tensor, requests: list[Request], offsets: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The draft's tokens [B] and, when any request samples, its distributions q [B, V]
    (exactly what the tokens were drawn from: the request's temperature and filters)."""
    greedy = logits.argmax(dim=-1)
    if all(r.params.greedy for r in requests):
        return greedy, None
    device = logits.device
    probs = filtered_probs(logits, requests, device)
    seeds = to_device([r.sampling_seed ^ DRAFT_SEED_SALT for r in requests], torch.int64,
                      device)
    steps = to_device([r.num_output_tokens + o for r, o in zip(requests, offsets)],
                      torch.int64, device)
    race = probs / -torch.log(ref.uniform_noise(seeds, steps, logits.shape[-1]))
    is_greedy = to_device([r.params.greedy for r in requests], torch.bool, device)
    return torch.where(is_greedy, greedy, race.argmax(dim=-1)), probs


def filtered_probs(logits: torch.Tensor, requests: list[Request],
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
