"""The `LLM` facade: `LLM(path).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import gc
import numbers
import os
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
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

    Threads may share an LLM: its calls run one at a time (generate, chat and beam_search
    whole; the engine's add_request, step and abort each, so a stream read in one thread
    waits for a generate in another to end). close() does not wait: a call running in
    another thread ends with a KilnError saying the engine is closed.
    """

    def __init__(self, model: str | Path | None = None, build_config: BuildConfig | None = None,
                 **options: Any) -> None:
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise KilnError(f"LLM(model) takes a path (str or Path) or None, got "
                            f"{type(model).__name__}")
        if build_config is not None and not isinstance(build_config, BuildConfig):
            raise KilnError(f"LLM(build_config=) takes a BuildConfig, got "
                            f"{type(build_config).__name__}")
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
        self._engine = _Engine(self.engine_dir, runtime)
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
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, *,
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """One output per prompt, in order. Prompts are strings or token-id lists; the
        SamplingParams (one for all, or one per prompt) by position or as sampling_params
        (vLLM's name) or params."""
        params = _one_of(sampling_params, params)
        prompts = _prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        elif not isinstance(params, (Sequence, Iterator)) or isinstance(params, (str, bytes)):
            raise RequestError("params must be SamplingParams (one, or one per prompt); got "
                               f"{type(params).__name__}")
        elif len(params := list(params)) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} SamplingParams: "
                               "give one for all, or one per prompt")
        elif not all(isinstance(p, SamplingParams) for p in params):
            raise RequestError("params must be SamplingParams (one, or one per prompt)")
        ids: list[str] = []
        results: dict[str, RequestOutput] = {}
        engine = self.engine
        with engine.lock:  # another thread's call runs before or after this one, whole
            self._run(engine, prompts, params, ids, results, use_tqdm)
        return [results[i] for i in ids]

    def _run(self, engine: _Engine, prompts: list[Prompt], params: list[SamplingParams],
             ids: list[str], results: dict[str, RequestOutput], use_tqdm: bool) -> None:
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

    def beam_search(self, prompts: Prompt | Sequence[Prompt],
                    params: BeamSearchParams | None = None) -> list[BeamSearchOutput]:
        """The best beams per prompt, best first, with cumulative logprobs and scores."""
        prompts = _prompt_list(prompts)
        if params is not None and not isinstance(params, BeamSearchParams):
            raise RequestError(f"beam_search takes BeamSearchParams, got {type(params).__name__}")
        engine = self.engine
        with engine.lock:
            token_ids = [engine._encode(p) for p in prompts]
            return beam_search(engine, token_ids, params or BeamSearchParams())

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False, *,
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool | None = None, continue_final_message: bool = False,
             chat_template_kwargs: Mapping[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """One output per conversation, its prompt written by the chat template.

        As in vLLM: add_generation_prompt (default: True, unless continue_final_message)
        opens the assistant's turn; continue_final_message=True lets the model go on with
        the last message's text instead (its end-of-turn marker left out);
        chat_template_kwargs and tools go to the template."""
        params = _one_of(sampling_params, params)
        conversations = messages if messages and isinstance(messages, list) and \
            isinstance(messages[0], list) else [messages]
        for conversation in conversations:
            if not isinstance(conversation, list) or \
                    not all(isinstance(m, Mapping) for m in conversation):
                raise RequestError("messages must be a list of messages ({'role': ..., "
                                   "'content': ...}), or a list of such lists; got "
                                   f"{type(conversation).__name__}")
        if not all(conversations):
            raise RequestError("a conversation needs at least one message")
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        if add_generation_prompt and continue_final_message:
            raise RequestError("add_generation_prompt and continue_final_message cannot both "
                               "be True: a new turn, or the last message continued")
        extra = dict(chat_template_kwargs or {}) if chat_template_kwargs is None or \
            isinstance(chat_template_kwargs, Mapping) else None
        if extra is None or any(k in extra for k in ("messages", "add_generation_prompt",
                                                        "continue_final_message")):
            raise RequestError("chat_template_kwargs must be a dict of the template's other "
                               f"variables, got {chat_template_kwargs!r:.60}")
        if tools is not None:
            extra["tools"] = tools
        if self.tokenizer is None:
            raise KilnError("this engine has no tokenizer, so it cannot apply a chat template")
        # The template writes the special tokens itself: encode without adding a BOS.
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(
            c, add_generation_prompt, continue_final_message, **extra),
            add_special_tokens=False) for c in conversations]
        return self.generate(prompts, params, use_tqdm)


class _Engine(LLMEngine):
    """An LLM's engine: its calls that change requests or run the model take `lock` (an
    RLock, which the LLM's own calls hold throughout), so threads take turns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.lock = threading.RLock()
        super().__init__(*args, **kwargs)

    def add_request(self, *args: Any, **kwargs: Any) -> str:
        with self.lock:
            return super().add_request(*args, **kwargs)

    def abort(self, request_id: str) -> None:
        with self.lock:
            super().abort(request_id)

    def step(self) -> list[RequestOutput]:
        with self.lock:
            return super().step()

    def sequence_logits(self, token_ids: list[int]) -> torch.Tensor:
        with self.lock:
            return super().sequence_logits(token_ids)


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


def _one_of(sampling_params: Any, params: Any) -> Any:
    """The SamplingParams given by vLLM's keyword or kiln's (not both)."""
    if sampling_params is not None and params is not None:
        raise TypeError("give the SamplingParams as sampling_params or params, not both")
    return params if sampling_params is None else sampling_params


def _prompt_list(prompts: Any) -> list[Prompt]:
    """One prompt (a string, or token ids) or a sequence (or iterator) of them, as a list of
    prompts; a RequestError naming what is not one."""
    if isinstance(prompts, Iterator):
        prompts = list(prompts)
    if _is_prompt(prompts) and (isinstance(prompts, str) or prompts):
        return [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
        raise RequestError(f"prompts must be a string, a list of token ids, or a list of "
                           f"those; got {_kind(prompts)}")
    for i, prompt in enumerate(prompts):
        if not _is_prompt(prompt):
            raise RequestError(f"prompts[{i}] must be a string or a list of token ids, got "
                               f"{_kind(prompt)}")
    return list(prompts)


def _is_prompt(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray))
        and all(isinstance(t, numbers.Integral) for t in value))


def _kind(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return "bytes (decode them to a str first)"
    return type(value).__name__
