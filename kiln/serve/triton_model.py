"""kiln's LLMEngine as a Triton Inference Server model (Python backend, decoupled).

`kiln triton-repo` copies this file to `<repo>/<model>/1/model.py`; it runs inside
Triton's Python backend, where `triton_python_backend_utils` exists and kiln must be
installed. The engine steps in kiln's own background thread (continuous batching across
every request Triton hands in); `execute` only submits and returns at once. Each request
gets its responses through its response sender: the whole text in one final response, or
with `stream: true` one response per new piece of text. Responses go out from a sender
thread of their own (`_Outbox`), not from the engine thread: each send is a round trip to
the Triton server process, and the engine must not wait for them between steps. When the
sender falls behind, a stream's next response carries all the text that came meanwhile
(in order, nothing dropped; the final flag on the last). Whether the client cancelled is
asked (another round trip) every CANCEL_CHECK_EVERY responses of a request, or after
CANCEL_CHECK_S seconds, not before every response.
Inputs and parameters are those of Triton's generate extension (see generate_params).
The engine's KV-block and queue gauges go to Triton's own /metrics (custom metrics).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from kiln.errors import KilnError
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import RequestOutput
from kiln.runtime.text_deltas import TextDeltas
from kiln.serve.engine_loop import EngineLoop, NewRequest
from kiln.serve.generate_params import INPUTS, GenerateInput, parse_generate_request

log = logging.getLogger("kiln.triton")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_EVERY = 8  # a request's is_cancelled (a round trip) every 8 flushes,
CANCEL_CHECK_S = 0.25  # or when this long has passed since the last
GAUGE_INTERVAL_S = 0.05  # the engine's gauges go to Triton at most this often


def _text_response(text: str) -> Any:
    tensor = pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_))
    return pb_utils.InferenceResponse(output_tensors=[tensor])


def _error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class ResponseSender:
    """A decoupled Triton request's response sender: `done` once the final flag went
    out; errors become one final error response (called on the thread that sends)."""

    sender: Any
    done: bool = False

    def error(self, error: BaseException) -> None:
        if not self.done:
            self._send(_error_response(str(error)), FINAL)

    def _send(self, response: Any, flags: int) -> None:
        self.done = self.done or bool(flags & FINAL)
        if response is None:
            self.sender.send(flags=flags)
        else:
            self.sender.send(response, flags=flags)


class _Outbox:
    """The sender thread: sends the responses of every request whose output changed, and
    the engine's stats to the gauges, so the engine thread never waits on Triton."""

    def __init__(self, gauges: _Gauges | None) -> None:
        self._gauges = gauges
        self._ready: collections.deque[QueuedResponder] = collections.deque()
        self._stats: dict[str, float] | None = None
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="kiln-triton-send",
                                        daemon=True)
        self._thread.start()

    def post(self, responder: QueuedResponder) -> None:
        self._ready.append(responder)
        if not self._wake.is_set():  # set() takes a lock: once per batch, not per post
            self._wake.set()

    def stats(self, stats: dict[str, float]) -> None:
        self._stats = stats
        if not self._wake.is_set():
            self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(10)

    def _run(self) -> None:
        pushed = 0.0  # when the gauges were last set (each change is a round trip)
        while True:
            due = None if self._stats is None else \
                max(0.0, pushed + GAUGE_INTERVAL_S - time.monotonic())
            self._wake.wait(due)
            self._wake.clear()  # before draining: a post from now on wakes us again
            while self._ready:
                _call(self._ready.popleft().flush)
            if self._stats is not None and (time.monotonic() - pushed >= GAUGE_INTERVAL_S
                                            or self._stop):
                stats, self._stats = self._stats, None
                if self._gauges is not None:
                    _call(self._gauges.update, stats)
                pushed = time.monotonic()
            if self._stop:
                return


def _call(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("kiln: sending a response failed")


class QueuedResponder(ResponseSender):
    """One request's responses: the engine thread hands it outputs (`output`, `error`),
    the outbox's sender thread sends what is new (`flush`, then `_send_output` of the
    newest output), so the engine thread never waits on Triton. `streams`: every output
    is sent (else only the last, the sender woken now and then to ask whether the client
    cancelled)."""

    def __init__(self, sender: Any, loop: EngineLoop, request_id: str, outbox: _Outbox,
                 streams: bool) -> None:
        self.sender = sender
        self.loop = loop
        self.request_id = request_id
        self.outbox = outbox
        self.streams = streams
        self.done = False
        self._latest: RequestOutput | None = None  # newest output not yet sent
        self._error: BaseException | None = None
        self._queued = False
        self._checked = 0.0  # monotonic time of the last is_cancelled
        self._unchecked = CANCEL_CHECK_EVERY  # flushes since then (the first one asks)
        self._held = 0  # outputs of a whole answer not handed to the sender

    # ---- engine thread --------------------------------------------------------------
    def accepted(self) -> None:
        pass

    def output(self, output: RequestOutput) -> None:
        self._latest = output  # cumulative: a newer output replaces one not yet sent
        if self.streams or output.finished:
            self._schedule()
            return
        # A whole answer sends nothing before the end: wake the sender only to ask
        # whether the client cancelled, every CANCEL_CHECK_EVERY outputs.
        self._held += 1
        if self._held >= CANCEL_CHECK_EVERY:
            self._held = 0
            self._unchecked = CANCEL_CHECK_EVERY
            self._schedule()

    def error(self, error: BaseException) -> None:
        self._error = error
        self._schedule()

    def _schedule(self) -> None:
        if not self._queued:
            self._queued = True
            self.outbox.post(self)

    # ---- sender thread --------------------------------------------------------------
    def flush(self) -> None:
        self._queued = False  # before reading: a later output schedules us again
        output, error = self._latest, self._error
        if self.done:
            return
        try:
            if output is not None and not output.finished and self._cancelled():
                self.loop.abort([self.request_id])  # the client left: free the blocks now
                self._send(None, FINAL)
            elif output is not None:
                self._send_output(output)
            if error is not None:
                ResponseSender.error(self, error)
        except Exception as e:  # e.g. the request was cancelled in the meantime
            log.debug("kiln: response for %s not sent: %s", self.request_id, e)
            self.loop.abort([self.request_id])  # not one failed send per token to the end
            self.done = True

    def _cancelled(self) -> bool:
        now = time.monotonic()
        if self._unchecked < CANCEL_CHECK_EVERY and now - self._checked < CANCEL_CHECK_S:
            self._unchecked += 1
            return False
        self._checked, self._unchecked = now, 1
        return bool(getattr(self.sender, "is_cancelled", lambda: False)())

    def _send_output(self, output: RequestOutput) -> None:
        raise NotImplementedError


class _Responder(QueuedResponder):
    """The `kiln` model's responses: text (a stream's deltas, or the whole answer)."""

    def __init__(self, sender: Any, request: GenerateInput, loop: EngineLoop,
                 request_id: str, outbox: _Outbox) -> None:
        super().__init__(sender, loop, request_id, outbox, request.stream)
        self.request = request
        self.deltas = TextDeltas(request.params.stop)

    def _send_output(self, output: RequestOutput) -> None:
        if self.request.stream:
            delta = self.deltas.next(output.text, output.finished)
            if delta or output.finished:
                self._send(_text_response(delta), FINAL if output.finished else 0)
        elif output.finished:
            text = output.text
            if not self.request.exclude_input_in_output:
                text = self.request.text + text
            self._send(_text_response(text), FINAL)


_GAUGES = {"kv_blocks_used": "KV-cache blocks held by requests",
           "kv_blocks_total": "KV-cache blocks in the engine",
           "num_running": "requests in the running batch",
           "num_waiting": "requests waiting for a batch slot"}


class _Gauges:
    """kiln_<stat> gauges in Triton's Prometheus metrics (each change one IPC to Triton)."""

    def __init__(self, model_name: str) -> None:
        self.values: dict[str, float] = {}
        # Triton drops a family's metrics when the family object goes: keep both.
        self.families = {stat: pb_utils.MetricFamily(name=f"kiln_{stat}", description=text,
                                                     kind=pb_utils.MetricFamily.GAUGE)
                         for stat, text in _GAUGES.items()}
        self.metrics = {stat: family.Metric(labels={"model": model_name})
                        for stat, family in self.families.items()}

    def update(self, stats: dict[str, float]) -> None:
        for stat, metric in self.metrics.items():
            if self.values.get(stat) != stats[stat]:  # one IPC per change, not per step
                metric.set(float(stats[stat]))
                self.values[stat] = stats[stat]


def _request_body(request: Any) -> dict[str, Any]:
    """Triton tensors and request parameters -> the generate extension's JSON shape."""
    body: dict[str, Any] = {}
    for name, _, _ in INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            body[name] = tensor.as_numpy().tolist()
    parameters = request.parameters()
    body["parameters"] = json.loads(parameters) if parameters else {}
    return body


def _exit_with_server(server: int) -> None:
    """End this model's process once tritonserver (its parent) is gone: a server that
    stops without waiting for running requests (its exit timeout) would otherwise leave it
    generating for nobody, adopted by init."""
    def watch() -> None:
        while os.getppid() == server:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="kiln-server-watch", daemon=True).start()


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        _exit_with_server(os.getppid())
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                "kiln streams its responses: set model_transaction_policy { decoupled: true }")
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        engine_dir = Path(params.get("engine_dir") or "engine")
        if not engine_dir.is_absolute():  # relative to this version's folder
            engine_dir = Path(args["model_repository"]) / args["model_version"] / engine_dir
        runtime = RuntimeConfig(device=params.get("device") or "auto")
        engine = LLMEngine(engine_dir, runtime)
        gauges = (_Gauges(args.get("model_name", "kiln"))
                  if hasattr(pb_utils, "MetricFamily") else None)
        if gauges is not None:
            gauges.update(engine.stats())
        self.outbox = _Outbox(gauges)
        self.loop = EngineLoop(engine, self.outbox.stats)
        self.loop.start()
        log.info("kiln: serving %s on %s", engine_dir, self.loop.engine.device)

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                parsed = parse_generate_request(_request_body(request))
            except (KilnError, ValueError) as e:
                sender.send(_error_response(str(e)), flags=FINAL)
                continue
            request_id = uuid.uuid4().hex  # Triton's ids need not be unique across clients
            self.loop.add([NewRequest(parsed.text, parsed.params, request_id)],
                          _Responder(sender, parsed, self.loop, request_id, self.outbox))
        return None  # decoupled: responses go through the senders

    def finalize(self) -> None:
        self.loop.shutdown()
        self.outbox.shutdown()
