"""Beam search as a search mode beside the sampler, driven through the engine.

Every step, each live beam is one engine request for a single token with the top-2W
logprobs of the model's distribution. Beams that share a prefix share its full KV blocks
through the prefix cache (block-level copy-on-write: a beam's partial last block is
recomputed rather than copied), and beam requests batch with all other traffic.

Scoring and stopping follow HuggingFace transformers' beam search: the top 2W
continuations over all beams are ranked by cumulative logprob; those that end (EOS or
max length) and rank in the top W become finished hypotheses scored
logprob_sum / generated_len ** length_penalty; the best W unfinished ones continue.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from kiln.errors import RequestError
from kiln.runtime.engine import LLMEngine
from kiln.runtime.intake import check_request
from kiln.runtime.request import SamplingParams

NEG_INF = -1.0e9


@dataclass
class BeamSearchParams:
    beam_width: int = 4
    max_tokens: int = 16
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as in transformers
    ignore_eos: bool = False
    num_return_sequences: int | None = None  # default: beam_width

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """RequestError for a value of the wrong kind or out of range (beam_search runs
        this again, for values set after construction)."""
        for name in ("beam_width", "max_tokens", "num_return_sequences"):
            value = getattr(self, name)
            if (value is not None or name != "num_return_sequences") and (
                    isinstance(value, bool) or not isinstance(value, numbers.Integral)
                    or value < 1):
                raise RequestError(f"{name} must be a whole number >= 1, got {value!r}")
        if isinstance(self.length_penalty, bool) or \
                not isinstance(self.length_penalty, numbers.Real) or \
                not math.isfinite(self.length_penalty):
            raise RequestError(f"length_penalty must be a finite number, got "
                               f"{self.length_penalty!r}")
        if not any(self.early_stopping is v for v in (True, False)) and \
                self.early_stopping != "never":
            raise RequestError(f"early_stopping must be True, False or 'never', got "
                               f"{self.early_stopping!r}")
        if not 1 <= (self.num_return_sequences or self.beam_width) <= self.beam_width:
            raise RequestError(f"num_return_sequences must be in [1, beam_width "
                               f"({self.beam_width})], got {self.num_return_sequences}")


@dataclass
class BeamSequence:
    token_ids: list[int]  # generated tokens only
    cumulative_logprob: float
    score: float  # cumulative_logprob / len ** length_penalty
    text: str = ""


@dataclass
class BeamSearchOutput:
    prompt_token_ids: list[int]
    sequences: list[BeamSequence]  # best first


@dataclass
class _Search:
    prompt: list[int]
    params: BeamSearchParams
    running: list[tuple[list[int], float]]  # (generated tokens, cumulative logprob)
    finished: list[BeamSequence] = field(default_factory=list)
    improvable: bool = True
    done: bool = False


def beam_search(engine: LLMEngine, prompts: list[list[int]],
                params: BeamSearchParams) -> list[BeamSearchOutput]:
    """Every prompt is checked as a request of max_tokens before the search starts."""
    if not isinstance(params, BeamSearchParams):
        raise RequestError(f"params must be BeamSearchParams, got {type(params).__name__}")
    params.validate()
    vocab = engine.config.model.vocab_size
    if params.beam_width > vocab:
        raise RequestError(f"beam_width must be at most the vocabulary size ({vocab}), got "
                           f"{params.beam_width}")
    for prompt in prompts:
        check_request(prompt, SamplingParams(max_tokens=params.max_tokens), vocab,
                      engine.max_seq_len, unbounded=engine.streaming is not None)
    searches = [_Search(p, params, [([], 0.0)]) for p in prompts]
    live: set[str] = set()  # beam requests in the engine
    try:
        _run(engine, searches, params, live)
    finally:  # after an error or Ctrl-C: leave no beam running
        for rid in live:
            engine.abort(rid)
    outputs = []
    for s in searches:
        best = sorted(s.finished, key=lambda b: -b.score)
        best = best[: params.num_return_sequences or params.beam_width]
        for b in best:
            if engine.tokenizer is not None:
                b.text = engine.tokenizer.decode(b.token_ids)
        outputs.append(BeamSearchOutput(s.prompt, best))
    return outputs


def _run(engine: LLMEngine, searches: list[_Search], params: BeamSearchParams,
         live: set[str]) -> None:
    width = params.beam_width
    # Top 2W continuations of each beam (no more than the vocabulary has).
    top_n = min(2 * width, engine.config.model.vocab_size)
    eos = () if params.ignore_eos else engine.eos_token_ids
    while not all(s.done for s in searches):
        # One engine request per live beam, all run together.
        ids: dict[str, tuple[_Search, int]] = {}
        for si, s in enumerate(searches):
            if s.done:
                continue
            for bi, (tokens, _) in enumerate(s.running):
                rid = f"beam-{si}-{bi}-{len(tokens)}"
                engine.add_request(s.prompt + tokens, SamplingParams(
                    max_tokens=1, temperature=0, logprobs=top_n, ignore_eos=True), rid)
                live.add(rid)
                ids[rid] = (s, bi)
        top: dict[str, dict[int, float]] = {}
        while len(top) < len(ids):
            for out in engine.step():
                if out.finished and out.request_id in ids:
                    top[out.request_id] = out.outputs[0].logprobs[0]
                    live.discard(out.request_id)
        for s in searches:
            if s.done:
                continue
            candidates = []  # (cumulative logprob, parent beam, token)
            for rid, (owner, bi) in ids.items():
                if owner is s:
                    tokens, score = s.running[bi]
                    candidates += [(score + lp, bi, t) for t, lp in top[rid].items()]
            candidates.sort(key=lambda c: -c[0])
            _advance(s, candidates[:2 * width], eos)
    outputs = []
    for s in searches:
        best = sorted(s.finished, key=lambda b: -b.score)
        best = best[: params.num_return_sequences or width]
        for b in best:
            if engine.tokenizer is not None:
                b.text = engine.tokenizer.decode(b.token_ids)
        outputs.append(BeamSearchOutput(s.prompt, best))
    return outputs


def _advance(s: _Search, candidates: list[tuple[float, int, int]], eos: tuple[int, ...]) -> None:
    p, width = s.params, s.params.beam_width
    gen_len = len(s.running[0][0]) + 1
    at_max = gen_len >= p.max_tokens
    full = len(s.finished) == width
    running = []
    for rank, (score, bi, token) in enumerate(candidates):
        tokens = s.running[bi][0] + [token]
        ends = at_max or token in eos
        if ends:
            accepted = rank < width and s.improvable and not (full and p.early_stopping is True)
            if accepted:
                s.finished.append(BeamSequence(tokens, score, score / gen_len ** p.length_penalty))
        elif len(running) < width:
            running.append((tokens, score))
    s.finished = sorted(s.finished, key=lambda b: -b.score)[:width]
    s.running = running
    # transformers' stopping rules: can a running beam still beat the worst finished one?
    if running:
        length = p.max_tokens if (p.early_stopping == "never" and p.length_penalty > 0) \
            else gen_len
        best_possible = running[0][1] / length ** p.length_penalty
        worst = s.finished[-1].score if len(s.finished) == width else NEG_INF
        s.improvable = s.improvable and best_possible > worst
    all_full = len(s.finished) == width and p.early_stopping is True
    s.done = not running or at_max or not s.improvable or all_full
