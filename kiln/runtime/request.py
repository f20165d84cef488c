"""Requests as the engine tracks them, their sampling parameters, and what users get back."""

from __future__ import annotations

import enum
import math
import numbers
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.errors import RequestError

INT64 = 1 << 63  # seeds are signed 64-bit integers: [-INT64, INT64)


@dataclass
class SamplingParams:
    """Per-request generation settings (names follow vLLM / the OpenAI API)."""

    n: int = 1
    max_tokens: int | None = 16  # None: up to the engine's max_seq_len
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # or one string; None: none, as in vLLM
    stop_token_ids: list[int] = field(default_factory=list)  # None: none
    bad_words: list[str] = field(default_factory=list)  # None: none
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # top-n logprobs per generated token
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None  # token id (or its digits) -> added to its logit
    allowed_token_ids: list[int] | None = None  # only these may be sampled (None: any)
    # Structured output (needs xgrammar; kiln/runtime/grammar.py), at most one of four: the
    # text is JSON valid against json_schema ({"type": "object"} for any JSON object),
    # matches the regular expression regex, is exactly one of the strings of choice, or is
    # a sentence of grammar (EBNF as xgrammar and llama.cpp's GBNF write it, rule "root").
    json_schema: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # Speculative decoding (an engine started with a speculative_config): drafts per verify
    # step for this request, 0 to decode it plainly; None: the engine's
    # num_speculative_tokens. More than the engine's is refused when the request arrives.
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def constraint(self) -> tuple[str, Any] | None:
        """(kind, value) of the structured-output field that is set, or None."""
        for kind in CONSTRAINTS:
            value = getattr(self, kind)
            if value is not None:
                return kind, value
        return None

    def validate(self) -> None:
        """Raise RequestError for a value of the wrong kind or out of range. Also puts the
        word lists in their one form, whenever they were set (a str assigned to stop after
        construction is one stop string, not its characters). The engine runs this when
        a request is added; what depends on the engine (the vocabulary, max_seq_len) is
        checked there (kiln.runtime.intake.check_request)."""
        self.stop = [s for s in _strings("stop", self.stop) if s]  # "" would match anywhere
        self.bad_words = [w for w in _strings("bad_words", self.bad_words) if w]
        self.stop_token_ids = _token_ids(self.stop_token_ids)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _token_ids(self.allowed_token_ids, "allowed_token_ids")
            if not self.allowed_token_ids:
                raise RequestError("allowed_token_ids is empty: no token could be sampled")
        for name in ("n", "max_tokens", "min_tokens", "top_k", "seed", "logprobs",
                     "prompt_logprobs", "num_speculative_tokens"):
            value = getattr(self, name)
            if value is None and name in ("n", "min_tokens", "top_k"):
                raise RequestError(f"{name} must be a whole number, got None")
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, numbers.Integral)):
                raise RequestError(f"{name} must be a whole number, got {value!r}")
            if value is not None:  # a numpy integer as Python's (its sums would overflow)
                setattr(self, name, int(value))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
                    not math.isfinite(value):
                raise RequestError(f"{name} must be a finite number, got {value!r}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise RequestError(f"{name} must be True or False, got {_show(value)}")
            setattr(self, name, bool(value))
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.max_tokens is None or self.max_tokens >= 1,
             f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens must be at most max_tokens ({self.max_tokens}), got "
             f"{self.min_tokens}"),
            (self.seed is None or -INT64 <= self.seed < INT64, f"seed must be a signed 64-bit "
             f"integer, in [-2**63, 2**63 - 1], got {self.seed}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= -1, f"top_k must be -1, 0 (off) or positive, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs must be >= 0"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0,
             "prompt_logprobs must be >= 0"),
            (self.num_speculative_tokens is None or self.num_speculative_tokens >= 0,
             f"num_speculative_tokens must be an integer >= 0, got "
             f"{self.num_speculative_tokens!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)
        self._check_constraint()
        if self.logit_bias is not None and not isinstance(self.logit_bias, Mapping):
            raise RequestError("logit_bias must be a dict of token id -> bias, got "
                               f"{_show(self.logit_bias)}")
        if self.logit_bias is not None:
            self.logit_bias = _logit_bias(self.logit_bias)

    def _check_constraint(self) -> None:
        given = [kind for kind in CONSTRAINTS if getattr(self, kind) is not None]
        if len(given) > 1:
            raise RequestError(f"{given[0]} and {given[1]} both constrain the text; give one")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise RequestError(f"{name} must be a non-empty string, got {_show(value)}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or not all(
                    isinstance(c, str) and c for c in self.choice):
                raise RequestError("choice must be a list of non-empty strings, got "
                                   f"{_show(self.choice)}")
            self.choice = list(self.choice)


CONSTRAINTS = ("json_schema", "regex", "choice", "grammar")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _strings(name: str, value: Any) -> list[str]:
    """stop / bad_words: None, one string or a list of strings, as a new list."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
        return list(value)
    raise RequestError(f"{name} must be a string or a list of strings, got {_show(value)}")


def _token_ids(value: Any, name: str = "stop_token_ids") -> list[int]:
    """stop_token_ids (allowed_token_ids): None or a list of token ids (whole numbers >= 0),
    as a new list."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or any(
            isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in value):
        raise RequestError(f"{name} must be a list of token ids (whole numbers), got "
                           f"{_show(value)}")
    for t in value:
        if t < 0:
            raise RequestError(f"{name}: token id {t} is not in the vocabulary")
    return [int(t) for t in value]


def _logit_bias(value: Mapping) -> dict[int, float]:
    """logit_bias as {token id: bias}: keys are token ids, or their digits as the OpenAI
    API's JSON writes them ("50256"), as vLLM takes both; biases in [-100, 100]."""
    bias: dict[int, float] = {}
    for key, b in value.items():
        token_id = key
        if isinstance(key, str) and key.strip().lstrip("+-").isdigit():
            token_id = int(key)
        if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral):
            raise RequestError(f"logit_bias keys must be token ids, got {_show(key)}")
        if token_id < 0:
            raise RequestError(f"logit_bias: token id {token_id} is not in the vocabulary")
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or not -100 <= b <= 100:
            raise RequestError(f"logit_bias values must be in [-100, 100], got {_show(b)} "
                               f"for token {token_id}")
        bias[int(token_id)] = float(b)
    return bias


# Stands in request.token_ids for a sampled token still on its way from the device.
PLACEHOLDER = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self._value_ in _FINISHED  # (per token and request: not through .name)


_FINISHED = frozenset(("stop", "length", "abort"))


@dataclass
class RequestStats:
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    # Speculative decoding: verify steps, drafts proposed, drafts accepted.
    num_spec_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


class Request:
    """One sequence being generated. The scheduler and KV manager read and update it."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)  # (read per token: no property)
        self.token_ids = list(prompt_token_ids)  # prompt + output, grows each step
        self.params = params
        self.max_tokens = max_tokens  # resolved: never past the engine's max_seq_len
        self.eos_token_ids = eos_token_ids
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # prefix-cache hashes of its full blocks
        self.rope_long = False  # computed with LongRoPE's long factors (Scheduler)
        self.num_committed_blocks = 0  # of block_ids, registered in the prefix cache
        self.num_released_blocks = 0  # leading block_ids outside a sliding window, released
        # Attention sinks (kiln.runtime.streaming): tokens evicted between the sinks and the
        # window; block_ids then hold only the kept blocks, and cache index = position - this.
        self.num_evicted_tokens = 0
        self.stats = RequestStats()
        self.stop_reason: int | str | None = None
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, float]] = []
        # The int64 seed of this sequence's sampling noise: per request, so a seeded request
        # is batch invariant (new_group: seed + i, wrapped to 64 bits).
        self.sampling_seed = 0
        self.bad_words_token_ids: list[list[int]] = []
        self.prompt_logprobs: int | None = None  # top-n prompt logprobs wanted from this one
        self.grammar: Any = None  # xgrammar GrammarMatcher of a json_schema request
        # Draft tokens to verify in the next step (speculative decoding), not yet in
        # token_ids; and the draft's distributions they were sampled from, if any.
        self.spec_token_ids: list[int] = []
        self.spec_draft_probs: Any = None  # [k, vocab] tensor for a sampled draft
        # Adaptive speculation: verify steps (or n-gram lookups) in a row that gained no
        # token, and the output length at which a paused request proposes drafts again.
        self.spec_misses = 0
        self.spec_resume_at = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens known on the host (without a trailing in-flight placeholder)."""
        end = len(self.token_ids)
        while end > self.num_prompt_tokens and self.token_ids[end - 1] == PLACEHOLDER:
            end -= 1
        return self.token_ids[self.num_prompt_tokens:end]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def banned_next_tokens(self) -> list[int]:
        """Last tokens of bad words whose other tokens end the output so far."""
        if not self.bad_words_token_ids:
            return []
        output = self.output_token_ids
        banned = []
        for words in self.bad_words_token_ids:
            prefix = words[:-1]
            if not prefix or (len(output) >= len(prefix) and output[-len(prefix):] == prefix):
                banned.append(words[-1])
        return banned

    def __repr__(self) -> str:
        return (f"Request({self.request_id}, {self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    """What a user gets for one prompt. `.text` etc. read the first (usually only) output."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestStats | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
