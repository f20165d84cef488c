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

from dataclasses import dataclass, field

from kiln.errors import RequestError
from kiln.runtime.engine import LLMEngine
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
        if self.beam_width < 1 or self.max_tokens < 1:
            raise RequestError("beam_width and max_tokens must be at least 1")
        if self.early_stopping not in (True, False, "never"):
            raise RequestError("early_stopping must be True, False or 'never'")
        if not 1 <= (self.num_return_sequences or self.beam_width) <= self.beam_width:
            raise RequestError("num_return_sequences must be in [1, beam_width]")


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
    vocab = engine.config.model.vocab_size
    if params.beam_width > vocab:
        raise RequestError(f"beam_width must be at most the vocabulary size ({vocab}), got "
                           f"{params.beam_width}")
    searches = [_Search(p, params, [([], 0.0)]) for p in prompts]
    width = params.beam_width
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
                    max_tokens=1, temperature=0, logprobs=2 * width, ignore_eos=True), rid)
                ids[rid] = (s, bi)
        top: dict[str, dict[int, float]] = {}
        while len(top) < len(ids):
            for out in engine.step():
                if out.finished and out.request_id in ids:
                    top[out.request_id] = out.outputs[0].logprobs[0]
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
