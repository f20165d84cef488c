"""Triton Python-backend models with TensorRT-LLM's tensor contract (see trtllm_contract).

`kiln triton-repo --tensorrt-llm` writes four models whose model.py imports a class from
here (so this module runs only inside Triton, where triton_python_backend_utils exists):

- `tensorrt_llm` (decoupled): token ids in, token ids out, one kiln engine stepping in
  its own thread; every request joins the running batch (in-flight batching). With
  `streaming` each response carries the new tokens, else one response carries the whole
  sequence (the prompt first unless `exclude_input_in_output`).
- `preprocessing`: text, stop/bad word strings -> ids with the engine's tokenizer.
- `postprocessing`: ids -> text.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from kiln.errors import KilnError, RequestError
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import RequestOutput, SamplingParams
from kiln.serve.engine_loop import EngineLoop, NewRequest
from kiln.serve.generate_params import utf8
from kiln.serve.triton_model import (
    FINAL,
    QueuedResponder,
    _error_response,
    _exit_with_server,
    _Gauges,
    _Outbox,
)
from kiln.serve.trtllm_contract import ENSEMBLE_INPUTS
from kiln.tokenizer import Tokenizer


def _params(args: dict[str, str]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def _engine_dir(args: dict[str, str]) -> Path:
    path = Path(_params(args).get("engine_dir") or "engine")
    return path if path.is_absolute() else Path(args["model_repository"]) / path


def _input(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _one_row(name: str, array: np.ndarray) -> np.ndarray:
    """The request's single batch row (kiln takes one sequence per request)."""
    if array.shape[0] != 1:
        raise RequestError(f"{name}: send one sequence per request (batch dim 1), "
                           f"got {array.shape[0]}")
    return array[0]


def _scalar(request: Any, name: str) -> Any:
    array = _input(request, name)
    if array is None:
        return None
    value = _one_row(name, array).reshape(-1)
    if value.size != 1:
        raise RequestError(f"{name} must hold one value, got {value.size}")
    return value[0].item()


def _word_lists(name: str, array: np.ndarray | None) -> list[list[int]]:
    """TensorRT-LLM's [2, n] word list: row 0 the ids of all words back to back, row 1
    each word's end offset, padded with -1."""
    if array is None:
        return []
    rows = _one_row(name, array)
    if rows.ndim != 2 or rows.shape[0] != 2:
        raise RequestError(f"{name} must have shape [1, 2, n]")
    ids, offsets = rows[0].tolist(), [o for o in rows[1].tolist() if o >= 0]
    words, start = [], 0
    for end in offsets:
        if not start <= end <= len(ids):
            raise RequestError(f"{name}: offset {end} is outside the {len(ids)} ids")
        if end > start:
            words.append(ids[start:end])
        start = end
    return words


# tensorrt_llm input -> the ensemble input that feeds it, where the names differ
_ENSEMBLE_NAME = {target: spec.name for spec, step, target in ENSEMBLE_INPUTS
                  if step == "tensorrt_llm" and spec.name != target}


def _as_sent(name: str) -> str:
    """An input's name in an error: "runtime_top_k (the ensemble's top_k)"."""
    other = _ENSEMBLE_NAME.get(name)
    return name if other is None else f"{name} (the ensemble's {other})"


def word_list_tensor(words: list[list[int]]) -> np.ndarray:
    """The inverse of _word_lists: [1, 2, max(1, n)] int32."""
    ids = [i for w in words for i in w]
    offsets = np.cumsum([len(w) for w in words]).tolist()
    width = max(1, len(ids))
    out = np.full((1, 2, width), -1, dtype=np.int32)
    out[0, 0, :len(ids)] = ids
    out[0, 1, :len(offsets)] = offsets
    return out


class _TokenResponder(QueuedResponder):
    """One tensorrt_llm request's token responses, sent by the outbox's thread (the engine
    thread never waits on Triton); a stream's response holds every token new since the
    last one sent."""

    def __init__(self, sender: Any, loop: EngineLoop, outbox: _Outbox, request_id: str,
                 prompt: list[int], streaming: bool, exclude_input: bool,
                 log_probs: bool) -> None:
        super().__init__(sender, loop, request_id, outbox, streaming)
        self.prompt, self.streaming, self.exclude_input = prompt, streaming, exclude_input
        self.log_probs = log_probs
        self.sent = [0]  # tokens already streamed, per sequence

    def _response(self, token_rows: list[list[int]], logprob_rows: list[list[float]],
                  cum: list[float]) -> Any:
        width = max(1, max(len(r) for r in token_rows))
        ids = np.zeros((1, len(token_rows), width), dtype=np.int32)
        lps = np.zeros((1, len(token_rows), width), dtype=np.float32)
        for b, (row, lp) in enumerate(zip(token_rows, logprob_rows)):
            ids[0, b, :len(row)] = row
            lps[0, b, :len(lp)] = lp
        lengths = np.array([[len(r) for r in token_rows]], dtype=np.int32)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("output_ids", ids), pb_utils.Tensor("sequence_length", lengths),
            pb_utils.Tensor("cum_log_probs", np.array([cum], dtype=np.float32)),
            pb_utils.Tensor("output_log_probs", lps)])

    def _send_output(self, output: RequestOutput) -> None:
        flags = FINAL if output.finished else 0
        seqs = output.outputs
        if len(self.sent) < len(seqs):
            self.sent += [0] * (len(seqs) - len(self.sent))
        lps = [[_chosen(d, t) for d, t in zip(s.logprobs or [], s.token_ids)] for s in seqs]
        cum = [float(s.cumulative_logprob or 0.0) for s in seqs]
        if self.streaming:
            rows = [s.token_ids[self.sent[i]:] for i, s in enumerate(seqs)]
            lp_rows = [lp[self.sent[i]:] for i, lp in enumerate(lps)]
            if any(rows) or output.finished:
                self.sent = [len(s.token_ids) for s in seqs]
                self._send(self._response(rows, lp_rows, cum), flags)
        elif output.finished:
            prefix = [] if self.exclude_input else self.prompt
            self._send(self._response([prefix + s.token_ids for s in seqs],
                                      [([0.0] * len(prefix)) + lp for lp in lps], cum), flags)


def _chosen(logprobs: dict[int, float], token: int) -> float:
    return float(logprobs.get(token, 0.0))


class TensorRTLLMModel:
    """The `tensorrt_llm` model: kiln's engine behind TensorRT-LLM's token tensors."""

    eos_ids: frozenset[int] = frozenset()  # the engine's end-of-sequence token ids

    def initialize(self, args: dict[str, str]) -> None:
        _exit_with_server(os.getppid())  # (see there)
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                "the tensorrt_llm model streams: set model_transaction_policy "
                "{ decoupled: true }")
        engine = LLMEngine(_engine_dir(args),
                           RuntimeConfig(device=_params(args).get("device") or "auto"))
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.config.model.vocab_size
        self.eos_ids = frozenset(engine.eos_token_ids)
        gauges = (_Gauges(args.get("model_name", "tensorrt_llm"))
                  if hasattr(pb_utils, "MetricFamily") else None)  # (a Triton without metrics)
        if gauges is not None:
            gauges.update(engine.stats())
        self.outbox = _Outbox(gauges)
        self.loop = EngineLoop(engine, self.outbox.stats)
        self.loop.start()

    def _parse(self, request: Any) -> tuple[list[int], SamplingParams, bool, bool, bool]:
        ids = _input(request, "input_ids")
        if ids is None:
            raise RequestError("input_ids is required")
        prompt = [int(i) for i in _one_row("input_ids", ids).reshape(-1).tolist()]
        length = _scalar(request, "input_lengths")
        if not prompt or length == 0:
            raise RequestError("the prompt is empty")
        if length is not None:
            if not 0 < length <= len(prompt):
                raise RequestError(f"input_lengths {length} does not fit the "
                                   f"{len(prompt)} input_ids")
            prompt = prompt[:length]
        max_tokens = _scalar(request, "request_output_len")
        if max_tokens is None or max_tokens < 1:
            raise RequestError("request_output_len must be at least 1")
        beam_width = _scalar(request, "beam_width") or 1
        if beam_width != 1:
            raise RequestError("beam_width > 1 is not served by kiln's tensorrt_llm model; "
                               "use num_return_sequences for several samples")
        fields: dict[str, Any] = {"max_tokens": int(max_tokens)}
        sent: dict[str, str] = {}  # SamplingParams field -> the input it came from
        for name, field in (("temperature", "temperature"), ("runtime_top_k", "top_k"),
                            ("runtime_top_p", "top_p"), ("min_tokens", "min_tokens"),
                            ("repetition_penalty", "repetition_penalty"),
                            ("presence_penalty", "presence_penalty"),
                            ("frequency_penalty", "frequency_penalty"),
                            ("random_seed", "seed"), ("seed", "seed"),
                            ("num_return_sequences", "n")):
            value = _scalar(request, name)
            if value is not None:
                fields[field], sent[field] = value, name
        if "seed" in fields and fields["seed"] >= 1 << 63:  # uint64 on the wire
            fields["seed"] -= 1 << 64
        end_id = _scalar(request, "end_id")
        stop_ids: list[int] = []
        if end_id is not None and end_id >= 0 and int(end_id) not in self.eos_ids:
            # the client's end token replaces EOS; one of the engine's EOS ids (what the
            # ensemble's preprocessing sends) keeps them all, as transformers stops
            fields["ignore_eos"], stop_ids = True, [int(end_id)]
        stop, bad = [], []
        for word in self._words(request, "stop_words_list"):
            if len(word) == 1:
                stop_ids.append(word[0])
            else:  # a multi-token stop word ends generation when its text appears
                stop.append(self._decode(word))
        for word in self._words(request, "bad_words_list"):
            bad.append(self._decode(word))
        fields.update(stop_token_ids=stop_ids, stop=stop, bad_words=bad)
        log_probs = bool(_scalar(request, "return_log_probs"))
        if log_probs:
            fields["logprobs"] = 0
        streaming = bool(_scalar(request, "streaming"))
        exclude = bool(_scalar(request, "exclude_input_in_output"))
        try:
            params = SamplingParams(**fields)
        except (KilnError, TypeError, ValueError) as e:  # named as sent: not "n", "top_k"
            message = str(e)
            field = message.split(" ", 1)[0]
            if sent.get(field, field) != field:
                message = _as_sent(sent[field]) + message[len(field):]
            raise RequestError(message) from None
        return prompt, params, streaming, exclude, log_probs

    def _words(self, request: Any, name: str) -> list[list[int]]:
        """A word list input, every id in the vocabulary (an id outside it would be
        dropped by the tokenizer, or make it raise, instead of a clear error)."""
        words = _word_lists(name, _input(request, name))
        for word in words:
            bad = next((i for i in word if not 0 <= i < self.vocab_size), None)
            if bad is not None:
                raise RequestError(f"{name}: token id {bad} is not in the vocabulary "
                                   f"(0 to {self.vocab_size - 1})")
        return words

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise RequestError("this engine has no tokenizer for multi-token word lists")
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt, params, streaming, exclude, log_probs = self._parse(request)
            except (KilnError, ValueError) as e:
                sender.send(_error_response(str(e)), flags=FINAL)
                continue
            request_id = uuid.uuid4().hex
            self.loop.add([NewRequest(prompt, params, request_id)],
                          _TokenResponder(sender, self.loop, self.outbox, request_id, prompt,
                                          streaming, exclude, log_probs))
        return None

    def finalize(self) -> None:
        self.loop.shutdown()
        self.outbox.shutdown()


class PreprocessingModel:
    """`preprocessing`: QUERY text -> INPUT_ID with the engine's tokenizer."""

    def initialize(self, args: dict[str, str]) -> None:
        tokenizer = Tokenizer.from_engine(_engine_dir(args))
        if tokenizer is None:
            raise pb_utils.TritonModelException("the engine has no tokenizer")
        self.tokenizer = tokenizer
        pad = tokenizer.token_to_id(tokenizer.special["pad_token"])
        self.end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
        self.pad_id = pad if pad is not None else self.end_id

    def _words(self, name: str, array: np.ndarray | None) -> np.ndarray:
        words = []
        for item in ([] if array is None else array[0].reshape(-1).tolist()):
            text = utf8(name, item) if isinstance(item, bytes) else str(item)
            if text:
                words.append(self.tokenizer.encode(text, add_special_tokens=False))
        return word_list_tensor(words)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                query = _input(request, "QUERY")
                text = _one_row("QUERY", query).reshape(-1)[0]
                ids = self.tokenizer.encode(utf8("QUERY (the ensemble's text_input)", text)
                                            if isinstance(text, bytes) else text)
                out_len = _input(request, "REQUEST_OUTPUT_LEN").reshape(1, -1)[:, :1]
                end_id = _scalar(request, "END_ID")
                pad_id = _scalar(request, "PAD_ID")
                tensors = [
                    ("INPUT_ID", np.array([ids], np.int32)),
                    ("REQUEST_INPUT_LEN", np.array([[len(ids)]], np.int32)),
                    ("BAD_WORDS_IDS", self._words("BAD_WORDS_DICT (the ensemble's bad_words)",
                                                  _input(request, "BAD_WORDS_DICT"))),
                    ("STOP_WORDS_IDS", self._words("STOP_WORDS_DICT (the ensemble's stop_words)",
                                                   _input(request, "STOP_WORDS_DICT"))),
                    ("REQUEST_OUTPUT_LEN", out_len.astype(np.int32)),
                    ("OUT_END_ID", np.array([[self.end_id if end_id is None else end_id]],
                                            np.int32)),
                    ("OUT_PAD_ID", np.array([[self.pad_id if pad_id is None else pad_id]],
                                            np.int32))]
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, a) for n, a in tensors]))
            except (KilnError, ValueError, IndexError) as e:
                responses.append(_error_response(f"preprocessing: {e}"))
        return responses


class PostprocessingModel:
    """`postprocessing`: TOKENS_BATCH [1, beam, n] and SEQUENCE_LENGTH -> OUTPUT text."""

    def initialize(self, args: dict[str, str]) -> None:
        tokenizer = Tokenizer.from_engine(_engine_dir(args))
        if tokenizer is None:
            raise pb_utils.TritonModelException("the engine has no tokenizer")
        self.tokenizer = tokenizer

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            tokens = _input(request, "TOKENS_BATCH")
            lengths = _input(request, "SEQUENCE_LENGTH")
            texts = [[self.tokenizer.decode(row[:n].tolist()).encode()
                      for row, n in zip(beams, beam_lengths)]
                     for beams, beam_lengths in zip(tokens, lengths)]
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT", np.array(texts, dtype=np.object_))]))
        return responses
