"""The `LLM` facade: `LLM(path).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import gc
import numbers
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kiln.build.engine_dir import load_engine_config
from kiln.config import LIMITS, BuildConfig
from kiln.errors import KilnError, RequestError
from kiln.resolve import resolve_engine
from kiln.runtime.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.heap import frozen_while
from kiln.runtime.request import RequestOutput, SamplingParams

Prompt = str | list[int]

# The multi-rank engines of this process's LLMs. A process holds one process group at a
# time: an engine whose LLM was dropped without close() is closed when the next LLM loads.
_MULTI_RANK: list[tuple[weakref.ref, LLMEngine]] = []


class LLM:
    """Offline generation. `model` is an engine dir, a HF folder, a GGUF file, or None
    for the default model; the latter three are built once into the cache.

    Keyword arguments that name a BuildConfig field (quantization="fp8",
    kv_cache_dtype="fp8", dtype, ...) set build options; the others are RuntimeConfig
    fields (device, num_kv_blocks, ...). The limits max_batch_size, max_num_tokens and
    max_seq_len are runtime settings of any engine (up to its built max_seq_len), and size
    an engine built into the cache.

    `close()` (or leaving `with LLM(...) as llm:`) releases the engine: a multi-rank
    engine's other ranks stop and its process group is freed, so the process can load
    another; using the LLM after it is a KilnError. An LLM dropped without close() has
    its multi-rank engine closed when the next LLM loads.
    """

    def __init__(self, model: str | Path | None = None, build_config: BuildConfig | None = None,
                 **options: Any) -> None:
        build_fields = {f.name for f in dataclasses.fields(BuildConfig)}
        runtime_fields = {f.name for f in dataclasses.fields(RuntimeConfig)}
        unknown = sorted(set(options) - build_fields - runtime_fields)
        if unknown:
            raise KilnError(f"LLM() got unknown option(s) {', '.join(unknown)}; it takes "
                            "BuildConfig and RuntimeConfig fields, e.g. dtype, quantization, "
                            "kv_cache_dtype, device, max_batch_size, max_seq_len")
        limits = {k: options[k] for k in LIMITS if options.get(k) is not None}
        build_options = {k: options.pop(k) for k in list(options)
                         if k in build_fields and k not in LIMITS}
        if build_options or limits:
            build_config = dataclasses.replace(build_config or BuildConfig(), **build_options,
                                               **limits)
        # Limits stay in the runtime too: a cached engine serves them at runtime. Checked
        # (the device, ...) before a build that could take minutes.
        runtime = RuntimeConfig(**options)
        self._engine: LLMEngine | None = None
        self.engine_dir = resolve_engine(model, build_config)
        _release_dropped(self.engine_dir)
        self._engine = LLMEngine(self.engine_dir, runtime)
        self.tokenizer = self._engine.tokenizer
        if self._engine.mirror is not None:
            _MULTI_RANK.append((weakref.ref(self), self._engine))

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise KilnError("this LLM is closed (close(), or the end of its `with` block); "
                            "create a new LLM to generate again")
        return self._engine

    def close(self) -> None:
        """Release the engine (see the class); closing again does nothing."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        _MULTI_RANK[:] = [(ref, e) for ref, e in _MULTI_RANK if e is not engine]
        engine.close()
        del engine
        gc.collect()  # the weights and the KV cache go now, unless held elsewhere
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One output per prompt, in order. Prompts are strings or token-id lists."""
        prompts = _prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        elif len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} SamplingParams: "
                               "give one for all, or one per prompt")
        elif not all(isinstance(p, SamplingParams) for p in params):
            raise RequestError("params must be SamplingParams (one, or one per prompt)")
        ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        engine = self.engine
        engine.stream_outputs = False
        try:
            with frozen_while():  # no full collection walks the loaded engine meanwhile
                for prompt, sp in zip(prompts, params):
                    ids.append(engine.add_request(prompt, sp))
                # Until these requests finish: others (a stream read half-way) run along
                # and keep their outputs for their readers (LLMEngine._apply).
                pending = set(ids)
                with tqdm(total=len(ids), desc="generating", unit="req",
                          disable=not use_tqdm) as bar:
                    while pending and engine.has_unfinished():
                        for output in engine.step():
                            if output.finished and output.request_id in pending:
                                pending.discard(output.request_id)
                                results[output.request_id] = output
                                bar.update(1)
        finally:
            engine.stream_outputs = True
            for request_id in ids:  # after an error or Ctrl-C: leave nothing running
                if request_id not in results:
                    engine.abort(request_id)
        return [results[i] for i in ids]

    def beam_search(self, prompts: Prompt | Sequence[Prompt],
                    params: BeamSearchParams | None = None) -> list[BeamSearchOutput]:
        """The best beams per prompt, best first, with cumulative logprobs and scores."""
        prompts = _prompt_list(prompts)
        token_ids = [self.engine._encode(p) for p in prompts]
        return beam_search(self.engine, token_ids, params or BeamSearchParams())

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             params: SamplingParams | None = None) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        if not all(conversations):
            raise RequestError("a conversation needs at least one message")
        if self.tokenizer is None:
            raise KilnError("this engine has no tokenizer, so it cannot apply a chat template")
        # The template writes the special tokens itself: encode without adding a BOS.
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c),
                                         add_special_tokens=False) for c in conversations]
        return self.generate(prompts, params)


def _release_dropped(engine_dir: Path) -> None:
    """Close the multi-rank engines whose LLM is gone; a KilnError if a multi-rank engine
    is to load while an LLM holding another one is still open (llm.engine.close() closes
    only the engine: that is enough)."""
    for ref, engine in list(_MULTI_RANK):
        if ref() is None or engine.mirror.closed:
            _MULTI_RANK.remove((ref, engine))
            engine.close()
    build = load_engine_config(engine_dir).build
    if _MULTI_RANK and build.tp_size * build.pp_size > 1:
        raise KilnError("this process already runs a multi-rank engine (an LLM not closed "
                        "yet); call its close(), or use `with LLM(...) as llm:`, before "
                        "loading another one")


def _prompt_list(prompts: Any) -> list[Prompt]:
    """One prompt (a string, or token ids) or a sequence of them, as a list of prompts."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                    and isinstance(prompts[0], numbers.Integral)):
        return [prompts]
    if isinstance(prompts, Sequence) and not isinstance(prompts, (bytes, bytearray)) and \
            all(isinstance(p, str) or (isinstance(p, Sequence) and not isinstance(p, bytes)
                                       and all(isinstance(t, numbers.Integral) for t in p))
                for p in prompts):
        return list(prompts)
    raise RequestError("prompts must be a string, a list of token ids, or a list of those; "
                       f"got {type(prompts).__name__}")
