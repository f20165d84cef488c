"""LLMEngine: add_request / step / abort over the scheduler, KV manager and model runner."""

from __future__ import annotations

import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.build.engine_dir import load_engine_config
from kiln.errors import KilnError, RequestError
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.model_runner import ModelRunner, StepResult
from kiln.runtime.request import (
    CompletionOutput,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
)
from kiln.runtime.scheduler import Scheduler
from kiln.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeConfig:
    """Knobs chosen when an engine is loaded (the build fixed the rest)."""

    device: str = "auto"  # auto: cuda if available, else cpu
    num_kv_blocks: int | None = None  # None: sized from memory
    kv_cache_memory_fraction: float = 0.9  # of free GPU memory, after weights
    cpu_kv_cache_bytes: int = 1 << 30
    scheduler_policy: str = "max_utilization"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_batch_size: int | None = None  # None: the build's
    max_num_tokens: int | None = None  # None: the build's


@dataclass
class _Tracked:
    """Engine-side state of one request: text so far and its detokenizer."""

    request: Request
    prompt: str | None
    detok: IncrementalDetokenizer | None
    text: str = ""
    new_token_ids: list[int] = field(default_factory=list)


class LLMEngine:
    def __init__(self, engine_dir: str | Path, runtime: RuntimeConfig | None = None) -> None:
        self.engine_dir = Path(engine_dir)
        self.runtime = runtime = runtime or RuntimeConfig()
        self.config = load_engine_config(self.engine_dir)
        build = self.config.build
        device = runtime.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tokenizer = Tokenizer.from_engine(self.engine_dir)
        self.runner = ModelRunner(self.engine_dir, self.config, self.device)
        self.max_seq_len = build.max_seq_len
        num_blocks = runtime.num_kv_blocks or self._auto_num_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        self.kv = KVCacheManager(num_blocks, build.block_size, runtime.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.kv, runtime.max_batch_size or build.max_batch_size,
            runtime.max_num_tokens or build.max_num_tokens, runtime.scheduler_policy,
            runtime.enable_chunked_prefill)
        self.eos_token_ids = tuple(self.config.model.eos_token_ids) or (
            (self.tokenizer.eos_token_id,) if self.tokenizer and
            self.tokenizer.eos_token_id is not None else ())
        self.requests: dict[str, _Tracked] = {}
        self._ids = itertools.count()

    def _auto_num_blocks(self) -> int:
        per_block = self.runner.kv_bytes_per_block()
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.runtime.kv_cache_memory_fraction)
        else:
            budget = self.runtime.cpu_kv_cache_bytes
        build = self.config.build
        wanted = build.max_batch_size * -(-build.max_seq_len // build.block_size)
        at_least = -(-build.max_seq_len // build.block_size)  # one full-length request
        return max(min(budget // per_block, wanted), at_least)

    # ---- requests -------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a prompt (text or token ids). Raises RequestError for this request only."""
        params = params or SamplingParams()
        params.validate()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self._encode(prompt)
        if not token_ids:
            raise RequestError("the prompt is empty")
        vocab = self.config.model.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        room = self.max_seq_len - len(token_ids)
        if room < 1:
            raise RequestError(f"the prompt has {len(token_ids)} tokens; this engine's "
                               f"max_seq_len is {self.max_seq_len}, leaving no room to generate")
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room:
            raise RequestError(f"prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) "
                               f"exceeds max_seq_len ({self.max_seq_len})")
        request = Request(request_id, token_ids, params, max_tokens, self.eos_token_ids)
        request.sampling_seed = params.seed if params.seed is not None else \
            random.getrandbits(62)
        request.bad_words_token_ids = [self._encode(" " + w.lstrip(), False)
                                       for w in params.bad_words]
        detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens) \
            if self.tokenizer else None
        self.requests[request_id] = _Tracked(request, text, detok)
        self.scheduler.add(request)
        return request_id

    def _encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is None:
            raise RequestError("this engine has no tokenizer; pass token ids instead of text")
        return self.tokenizer.encode(prompt, add_special_tokens)

    def abort(self, request_id: str) -> None:
        tracked = self.requests.pop(request_id, None)
        if tracked and not tracked.request.status.finished:
            self.scheduler.finish(tracked.request, RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, apply the sampled tokens; outputs that changed."""
        out = self.scheduler.schedule()
        if not out:
            if self.scheduler.waiting and not self.scheduler.running:
                raise KilnError("the KV cache is too small for the next request")
            return []
        now = time.monotonic()
        for entry in out.scheduled:
            if entry.request.stats.first_scheduled_time is None:
                entry.request.stats.first_scheduled_time = now
        result = self.runner.execute(out)
        self.scheduler.update(out)
        return self._process(result)

    def _process(self, result: StepResult) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for row, (request, token) in enumerate(zip(result.requests, result.token_ids)):
            tracked = self.requests.get(request.request_id)
            if tracked is None or request.status.finished:
                continue
            request.token_ids.append(token)
            if request.stats.first_token_time is None:
                request.stats.first_token_time = now
            if result.logprobs is not None and request.params.logprobs is not None:
                self._record_logprobs(request, result, row)
            tracked.new_token_ids.append(token)
            if tracked.detok is not None:
                tracked.text += tracked.detok.add(token)
            self._check_stop(tracked, token)
            if request.status.finished:
                request.stats.finish_time = now
            outputs.append(self._output(tracked))
        return outputs

    def _record_logprobs(self, request: Request, result: StepResult, row: int) -> None:
        n = request.params.logprobs or 0
        values, ids = result.logprobs[row], result.logprob_ids[row]  # type: ignore[index]
        entry = {ids[0]: values[0]}
        entry.update(zip(ids[1:n + 1], values[1:n + 1]))
        request.logprobs.append(entry)
        request.cumulative_logprob += values[0]

    def _check_stop(self, tracked: _Tracked, token: int) -> None:
        request, params = tracked.request, tracked.request.params
        status = None
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                status, request.stop_reason = RequestStatus.FINISHED_STOPPED, None
            elif token in params.stop_token_ids:
                status, request.stop_reason = RequestStatus.FINISHED_STOPPED, token
            elif params.stop:
                status = self._check_stop_strings(tracked)
        if status is None and request.num_output_tokens >= request.max_tokens:
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self.scheduler.finish(request, status)

    def _check_stop_strings(self, tracked: _Tracked) -> RequestStatus | None:
        params = tracked.request.params
        for stop in params.stop:
            index = tracked.text.find(stop)
            if index >= 0:
                end = index + len(stop) if params.include_stop_str_in_output else index
                tracked.text = tracked.text[:end]
                tracked.request.stop_reason = stop
                return RequestStatus.FINISHED_STOPPED
        return None

    def _output(self, tracked: _Tracked) -> RequestOutput:
        r = tracked.request
        completion = CompletionOutput(
            index=0, text=tracked.text, token_ids=r.output_token_ids,
            finish_reason=r.finish_reason, stop_reason=r.stop_reason,
            cumulative_logprob=r.cumulative_logprob if r.params.logprobs is not None else None,
            logprobs=r.logprobs if r.params.logprobs is not None else None)
        finished = r.status.finished
        if finished:
            self.requests.pop(r.request_id, None)
        return RequestOutput(r.request_id, tracked.prompt, r.prompt_token_ids, [completion],
                             finished, r.stats)

    # ---- stats ----------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_total": self.kv.num_blocks,
            "kv_blocks_used": self.kv.num_used_blocks,
            "kv_blocks_free": self.kv.num_free_blocks,
            "kv_cache_usage": self.kv.usage,
            "prefix_cache_hit_rate": self.kv.hit_rate,
            "num_preemptions": self.scheduler.num_preemptions,
        }
