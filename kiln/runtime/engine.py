"""LLMEngine: add_request / step / abort over the scheduler, KV manager and model runner."""

from __future__ import annotations

import collections
import itertools
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kiln.build.engine_dir import load_engine_config
from kiln.distributed import Mapping
from kiln.distributed.comm import all_reduce_min, setup_custom_all_reduce
from kiln.errors import KilnError, PromptTooLongError, RequestError
from kiln.runtime import parallel
from kiln.runtime.config import RuntimeConfig, resolve_device
from kiln.runtime.intake import bad_words_token_ids, check_request, new_group
from kiln.runtime.kv_cache import KVCacheManager, auto_num_blocks
from kiln.runtime.limits import check_kv_blocks, runtime_limits
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.output_processor import Group, Sequence, apply_result
from kiln.runtime.profiling import compiles_after_load, loading, phase
from kiln.runtime.request import PLACEHOLDER, Request, RequestOutput, RequestStatus, SamplingParams
from kiln.runtime.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from kiln.runtime.speculative import SpeculativeConfig, Speculator
from kiln.runtime.step import PendingStep, StepResult
from kiln.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class LLMEngine:
    """The engine of one rank. A multi-rank engine (tp x pp > 1) runs one LLMEngine per
    rank (kiln.runtime.parallel): rank 0's takes the user's calls and mirrors them."""

    def __init__(self, engine_dir: str | Path, runtime: RuntimeConfig | None = None,
                 rank_context: Any = None) -> None:
        self.engine_dir = Path(engine_dir)
        self.runtime = runtime = runtime or RuntimeConfig()
        spec_config = SpeculativeConfig.parse(runtime.speculative_config)  # fail fast
        self.config = load_engine_config(self.engine_dir)
        build = self.config.build
        device = resolve_device(runtime.device)
        self.failure: str | None = None  # why a multi-rank engine cannot go on
        self.exit_on_failure = True  # a server keeps answering (503) instead
        self.tokenizer = Tokenizer.from_engine(self.engine_dir)
        world = build.tp_size * build.pp_size
        if spec_config is not None:
            spec_config.check_layout(build.tp_size, build.pp_size)
        self.rank_context, self.mirror = rank_context, None
        limits = runtime_limits(self.engine_dir, self.config, runtime, spec_config is not None)
        self.max_seq_len, self.max_batch_size = limits.max_seq_len, limits.max_batch_size
        self.max_num_tokens, self.streaming = limits.max_num_tokens, limits.streaming
        if world > 1 and device.startswith("cuda:"):
            raise KilnError(f"a {world}-rank engine takes GPUs 0-{world - 1} (one a rank), so "
                            f"--device {device} cannot place it; use --device cuda and "
                            "CUDA_VISIBLE_DEVICES to choose the GPUs")
        if world > 1 and rank_context is None:
            if device == "cuda" and torch.cuda.device_count() < world and \
                    parallel.launch.launcher_rank() is None:
                raise KilnError(f"the engine needs {world} GPUs, "
                                f"{torch.cuda.device_count()} are visible")
            self.rank_context, self.mirror = parallel.start(self, world, device)
        with parallel.starting(self):  # a rank lost meanwhile: one error, the ranks stopped
            self._load(spec_config, world, device)
        if self.rank_context is not None and self.rank_context.rank != 0 and \
                rank_context is None:
            parallel.launched_worker(self)  # serves rank 0, then exits

    def _load(self, spec_config: SpeculativeConfig | None, world: int, device: str) -> None:
        """Load this rank's weights, size and allocate the KV cache, warm up."""
        runtime, build = self.runtime, self.config.build
        if self.rank_context is not None:
            self.device = self.rank_context.device
            mapping = Mapping(world, self.rank_context.rank, build.tp_size, build.pp_size)
        else:
            self.device = torch.device(device)
            mapping = Mapping()
        self.runner = ModelRunner(self.engine_dir, self.config, self.device, mapping)
        self.custom_all_reduce = build.tp_size > 1 and self.device.type == "cuda" and \
            runtime.custom_all_reduce is not False and setup_custom_all_reduce(
                self.device, self.config.model.hidden_size, self.runner.dtype, build.tp_size)
        if self.streaming is not None:
            self.runner.cache_keys_unrotated()
        self.speculator: Speculator | None = None
        if spec_config is not None:
            # Before the KV pool is sized: a draft model's weights and cache need room.
            self.speculator = Speculator(self, spec_config)
        per_block = self.runner.kv_bytes_per_block()
        if self.speculator is not None:  # the draft's cache grows with the target's
            per_block += self.speculator.kv_bytes_per_block(build.block_size)
        num_blocks = runtime.num_kv_blocks or auto_num_blocks(
            per_block, self.device, runtime.kv_cache_memory_fraction,
            runtime.cpu_kv_cache_bytes, self.max_batch_size, self.max_seq_len, build.block_size)
        if world > 1:  # every rank must hold the same pool: the smallest rank decides
            num_blocks = all_reduce_min(num_blocks, self.device)
        check_kv_blocks(num_blocks, self.max_seq_len, build.block_size)
        max_num_tokens = self.max_num_tokens
        self.runner.allocate_kv_cache(num_blocks)
        # Every layer windowed: blocks behind the window are released.
        self.kv = KVCacheManager(num_blocks, build.block_size, runtime.enable_prefix_caching,
                                 self.config.model.uniform_window, self.streaming)
        with loading():  # Triton compiles here are expected; after it each is a stall, logged
            graph_tokens = min(runtime.prefill_graph_tokens, max_num_tokens, self.max_seq_len)
            if seconds := self.runner.warmup(max_num_tokens, self.max_seq_len, *(
                    (self.max_batch_size, graph_tokens) if runtime.cuda_graphs else ())):
                log.info("warmed up the eager path in %.1f s", seconds)
            if runtime.cuda_graphs:
                self.runner.capture_graphs(self.max_batch_size, graph_tokens,
                                           runtime.piecewise_graphs)
            if self.speculator is not None:  # a draft model's warm-up, verify graphs
                self.speculator.start()
        self.scheduler = Scheduler(
            self.kv, self.max_batch_size,
            max_num_tokens, runtime.scheduler_policy,
            runtime.enable_chunked_prefill)
        if self.runner.long_rope is not None:
            self.scheduler.long_rope_after = self.runner.long_rope[0]
        self.eos_token_ids = tuple(self.config.model.eos_token_ids) or (
            (self.tokenizer.eos_token_id,) if self.tokenizer and
            self.tokenizer.eos_token_id is not None else ())
        self.overlap = (
            runtime.overlap_scheduling if runtime.overlap_scheduling is not None
            else self.device.type == "cuda")
        self._pending: PendingStep | None = None
        # Pipeline parallel: up to pp_size micro-batches in flight, each of requests the
        # others do not hold, so stage s works on one while stage s+1 works on another.
        self.pipeline_depth = runtime.pipeline_depth or build.pp_size
        self._in_flight: collections.deque[tuple[PendingStep, set[str]]] = collections.deque()
        self.max_in_flight = 0  # most micro-batches seen in flight at once (a statistic)
        # False: step() returns finished requests only, sparing a per-token output object
        # for every running request (offline generation wants nothing in between).
        self.stream_outputs = True
        self.num_computed_tokens = 0  # tokens run through the model since load
        self.record_launches = False  # keep last_launch: the launched step's launch_shape()
        self.last_launch: tuple[int, int] | None = None
        self.groups: dict[str, Group] = {}
        self.streamed: dict[str, RequestOutput | None] = {}  # stream(): kiln.runtime.streams
        self._seq_of: dict[str, Sequence] = {}  # scheduler request id -> sequence
        self._ids = itertools.count()

    def fail(self, message: str) -> None:
        """A rank of this engine died: no step can complete any more (said once)."""
        if self.failure is None:
            self.failure = message
            parallel.failed(self, message)  # exits, unless a server answers 503 instead

    def close(self) -> None:
        """Stop the other ranks of a multi-rank engine (a single-rank one has none); a
        closed engine's step() is a KilnError."""
        if self.mirror is not None:
            self.mirror.close()
        self.failure = self.failure or ("this engine is closed (close()); load it again "
                                        "(a new LLM) to generate")

    # ---- requests -------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, seed_base: int | None = None) -> str:
        """Queue a prompt (text or token ids). Raises RequestError for this request only.

        Sequence i of the request samples with seed (params.seed, an int64, or seed_base
        or a random draw) + i, wrapped to 64 bits: the same seed always samples the same,
        and distinct seeds draw distinct streams."""
        params = params or SamplingParams()
        params.validate()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.groups:
            raise RequestError(f"request id {request_id!r} is already in use")
        token_ids = self._encode(prompt)
        max_tokens = check_request(
            token_ids, params, self.config.model.vocab_size, self.max_seq_len,
            unbounded=self.streaming is not None,
            max_drafts=self.speculator.config.num_speculative_tokens if self.speculator else 0)
        bad_words = bad_words_token_ids(self.tokenizer, params.bad_words)
        if params.constraint is not None:
            grammars = self._grammar_compiler()
            grammars.matcher(params.constraint)  # a bad constraint fails here, for this caller
        if params.seed is not None:
            seed_base = params.seed
        elif seed_base is None:
            seed_base = random.getrandbits(61)
        if self.mirror is not None:
            self.mirror.record(("add", token_ids, params, request_id, seed_base))
        group = new_group(request_id, prompt, token_ids, params, max_tokens, seed_base,
                          self.eos_token_ids, self.tokenizer, bad_words,
                          grammars if params.constraint is not None else None)
        self.groups[request_id] = group
        for seq in group.sequences:
            self._seq_of[seq.request.request_id] = seq
        # Siblings of n > 1 wait until the first has computed the prompt, then reuse its
        # KV blocks through the prefix cache instead of computing the prompt n times.
        lead, *rest = [s.request for s in group.sequences]
        self.scheduler.add(lead)
        if self.kv.enable_prefix_caching:
            group.held_back = rest
        else:
            for r in rest:
                self.scheduler.add(r)
        return request_id

    def _encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is None:
            raise RequestError("this engine has no tokenizer; pass token ids instead of text")
        return self.tokenizer.encode(prompt, add_special_tokens)

    def abort(self, request_id: str) -> None:
        """Stop a request at once and free all its KV blocks. Unknown ids are ignored."""
        if self.mirror is not None and request_id in self.groups:
            self.mirror.record(("abort", request_id))
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for seq in group.sequences:
            self._seq_of.pop(seq.request.request_id, None)
            if self.speculator is not None and self.speculator.draft is not None:
                self.speculator.draft.release(seq.request.request_id)
            if not seq.request.status.finished:
                self.scheduler.finish(seq.request, RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    # ---- the step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, apply the sampled tokens; outputs that changed.

        With overlap scheduling, this step is launched first and the previous step's
        tokens are applied while the device computes it; its own outputs come next call.
        """
        if self.failure is not None:
            raise KilnError(self.failure)
        step = self._step_pipelined if self.pipeline_depth > 1 else self._step
        # A rank lost in the step fails the engine (Mirror.call)
        return step() if self.mirror is None else self.mirror.call(("step",), step)

    def _step(self) -> list[RequestOutput]:
        previous, self._pending = self._pending, None
        processed = previous is not None
        outputs: list[RequestOutput] = []
        if previous and self.speculator and self.speculator.wants_host_tokens():
            outputs += self._process(previous.result())  # drafts follow its tokens
            previous = None
        with phase("kiln.schedule"):
            out = self.scheduler.schedule()
        if previous is not None and not (out and self.overlap and
                                         not out.needs_host_tokens):
            outputs += self._process(previous.result())
            previous = None
            # Those tokens may have finished requests this schedule still holds.
            out.scheduled = [e for e in out.scheduled if not e.request.status.finished]
        if out:
            pending = self._launch(out, previous)
            if self.overlap:
                self._pending = pending
            else:
                outputs += self._process(pending.result())
        elif not processed and self.scheduler.waiting:
            raise KilnError("the KV cache is too small for the next request")
        if previous is not None:
            outputs += self._process(previous.result())
        return outputs

    def _launch(self, out, previous: PendingStep | None = None) -> PendingStep:
        """Enqueue a scheduled step on the device; its sampled tokens are placeholders on
        the host until the step's result is processed."""
        self.num_computed_tokens += out.num_tokens
        if self.record_launches:  # kiln bench splits its step times by what they ran
            self.last_launch = out.launch_shape()
        pending = self.runner.launch(out, previous)
        self.scheduler.update(out)
        for request in pending.requests:
            request.token_ids.append(PLACEHOLDER)
        return pending

    def _step_pipelined(self) -> list[RequestOutput]:
        """One micro-batch per call: launch the requests no in-flight micro-batch holds
        (an equal share of those running), after applying the oldest micro-batch's tokens
        once pipeline_depth are in flight (or when nothing else can be launched). A
        scheduled request's tokens are always on the host, so no placeholder is filled
        on the device and the stages never wait for each other's sampling."""
        outputs: list[RequestOutput] = []
        if len(self._in_flight) >= self.pipeline_depth:
            outputs += self._process(self._in_flight.popleft()[0].result())
        busy = set().union(*(ids for _, ids in self._in_flight))
        active = len(self.scheduler.running) + len(self.scheduler.waiting)
        with phase("kiln.schedule"):
            out = self.scheduler.schedule(busy,
                                          max_seqs=max(1, -(-active // self.pipeline_depth)))
        if out:
            pending = self._launch(out)
            self._in_flight.append((pending, {e.request.request_id for e in out.scheduled}))
            self.max_in_flight = max(self.max_in_flight, len(self._in_flight))
        elif self._in_flight:
            outputs += self._process(self._in_flight.popleft()[0].result())
        elif self.scheduler.waiting:
            raise KilnError("the KV cache is too small for the next request")
        return outputs

    def _grammar_compiler(self):
        from kiln.runtime.grammar import GrammarCompiler

        if getattr(self, "_grammars", None) is None:
            if self.tokenizer is None:
                raise RequestError("structured output needs the engine's tokenizer")
            self._grammars = GrammarCompiler(self.tokenizer.folder, self.config.model.vocab_size,
                                             list(self.eos_token_ids))
        return self._grammars

    def _process(self, result: StepResult) -> list[RequestOutput]:
        with phase("kiln.detokenize"):
            return self._apply(result)

    def _apply(self, result: StepResult) -> list[RequestOutput]:
        changed = apply_result(result, self._seq_of, self.groups, self.scheduler)
        if self.speculator is not None:
            self.speculator.after_step(result.requests, result.token_ids)
        outputs, streamed = [], self.streamed
        for group in changed.values():
            if group.finished:
                self.groups.pop(group.request_id, None)
                for seq in group.sequences:
                    self._seq_of.pop(seq.request.request_id, None)
            elif not self.stream_outputs and group.request_id not in streamed:
                continue
            outputs.append(output := group.output())
            if streamed and group.request_id in streamed:  # for its stream, whoever steps
                streamed[group.request_id] = output
        return outputs

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None
               ) -> Iterator[str]:
        """Run one request (n=1) to the end, yielding its text as it is generated; the
        pieces join into the final text, even with other calls stepping the engine between
        them (kiln.runtime.streams)."""
        from kiln.runtime.streams import stream

        return stream(self, prompt, params)

    def sequence_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [len, vocab] (on the host) of every position of one sequence, computed in
        one step outside the scheduler (perplexity, evaluation)."""
        if self.mirror is not None:
            return self.mirror.call(("logits", list(token_ids)),
                                    lambda: self._sequence_logits(token_ids))
        return self._sequence_logits(token_ids)

    def _sequence_logits(self, token_ids: list[int]) -> torch.Tensor:
        if len(token_ids) > self.max_seq_len:
            raise PromptTooLongError(f"the sequence has {len(token_ids)} tokens; this "
                                     f"engine's max_seq_len is {self.max_seq_len}")
        check_request(list(token_ids), SamplingParams(max_tokens=None),
                      self.config.model.vocab_size, self.max_seq_len + 1)
        request = Request("eval", list(token_ids), SamplingParams(max_tokens=1), 1)
        self.scheduler.check_long_rope(request)
        if not self.kv.allocate(request, len(token_ids)):
            raise KilnError("the KV cache cannot hold this sequence")
        try:
            out = SchedulerOutput([ScheduledRequest(request, len(token_ids), sample=False)])
            return self.runner.forward_logits(out).cpu()
        finally:
            self.kv.free(request)

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
            "num_computed_tokens": self.num_computed_tokens, **compiles_after_load(),
            **(self.speculator.stats() if self.speculator is not None else {}),
        }
